//! Terminal output to HTML: text escaped, ANSI SGR colours and bold as
//! `<span class="…">`, every other escape sequence dropped.
//!
//! Output arrives in chunks cut anywhere (inside a UTF-8 character, inside
//! an escape sequence): an [`AnsiHtml`] keeps what a cut left over and the
//! current style, so a live log rendered chunk by chunk reads the same as
//! the whole log rendered at once.

/// Renders one stream of terminal output, chunk by chunk.
#[derive(Default)]
pub struct AnsiHtml {
    /// Bytes held back: an unfinished UTF-8 character or escape sequence.
    carry: Vec<u8>,
    fg: Option<u8>,
    bg: Option<u8>,
    bold: bool,
}

/// The longest escape sequence waited for; longer, it is dropped.
const MAX_ESCAPE: usize = 64;

impl AnsiHtml {
    pub fn new() -> Self {
        Self::default()
    }

    fn classes(&self) -> String {
        let mut c = Vec::new();
        if let Some(fg) = self.fg {
            c.push(format!("f{fg}"));
        }
        if let Some(bg) = self.bg {
            c.push(format!("b{bg}"));
        }
        if self.bold {
            c.push("bold".to_string());
        }
        c.join(" ")
    }

    fn styled(&self) -> bool {
        self.fg.is_some() || self.bg.is_some() || self.bold
    }

    fn sgr(&mut self, params: &str) {
        let codes: Vec<u32> = if params.is_empty() {
            vec![0]
        } else {
            params.split(';').map(|p| p.parse().unwrap_or(0)).collect()
        };
        let mut i = 0;
        while i < codes.len() {
            match codes[i] {
                0 => (self.fg, self.bg, self.bold) = (None, None, false),
                1 => self.bold = true,
                22 => self.bold = false,
                c @ 30..=37 => self.fg = Some((c - 30) as u8),
                39 => self.fg = None,
                c @ 40..=47 => self.bg = Some((c - 40) as u8),
                49 => self.bg = None,
                c @ 90..=97 => self.fg = Some((c - 90 + 8) as u8),
                c @ 100..=107 => self.bg = Some((c - 100 + 8) as u8),
                // 256 colours and true colour: the first 16 are kept, the
                // rest ignored; their arguments are skipped.
                c @ (38 | 48) => {
                    if codes.get(i + 1) == Some(&5) {
                        if let Some(&n) = codes.get(i + 2)
                            && n < 16
                        {
                            if c == 38 {
                                self.fg = Some(n as u8);
                            } else {
                                self.bg = Some(n as u8);
                            }
                        }
                        i += 2;
                    } else if codes.get(i + 1) == Some(&2) {
                        i += 4;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }

    /// The HTML for `bytes`, continuing from the chunks before.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(bytes);
        let mut out = String::with_capacity(data.len() + 16);
        let mut open = false;
        let mut i = 0;
        let mut text = Vec::new();
        let flush = |text: &mut Vec<u8>, out: &mut String, open: &mut bool, me: &AnsiHtml| {
            if text.is_empty() {
                return;
            }
            if me.styled() && !*open {
                out.push_str(&format!("<span class=\"{}\">", me.classes()));
                *open = true;
            }
            escape_into(&String::from_utf8_lossy(text), out);
            text.clear();
        };
        while i < data.len() {
            let b = data[i];
            if b == 0x1b {
                // ESC [ params final
                if i + 1 >= data.len() {
                    break; // wait for more
                }
                if data[i + 1] != b'[' {
                    i += 2; // a two-byte escape: dropped
                    continue;
                }
                let end = data[i + 2..]
                    .iter()
                    .position(|b| (0x40..=0x7e).contains(b))
                    .map(|p| i + 2 + p);
                let Some(end) = end else {
                    if data.len() - i > MAX_ESCAPE {
                        i = data.len();
                    }
                    break;
                };
                if data[end] == b'm' {
                    flush(&mut text, &mut out, &mut open, self);
                    if open {
                        out.push_str("</span>");
                        open = false;
                    }
                    self.sgr(&String::from_utf8_lossy(&data[i + 2..end]));
                }
                i = end + 1;
                continue;
            }
            if b == b'\r' {
                // A carriage return before a newline is the newline's; a lone
                // one (a progress bar) is kept as text by browsers as a space.
                i += 1;
                continue;
            }
            text.push(b);
            i += 1;
        }
        // An unfinished UTF-8 character at the end waits for the next chunk.
        if i >= data.len() {
            let keep = unfinished_utf8(&text);
            if keep > 0 {
                let at = text.len() - keep;
                self.carry.extend_from_slice(&text[at..]);
                text.truncate(at);
            }
        } else {
            self.carry.extend_from_slice(&data[i..]);
        }
        flush(&mut text, &mut out, &mut open, self);
        if open {
            out.push_str("</span>");
        }
        out
    }
}

/// How many bytes at the end of `b` begin a UTF-8 character not yet whole.
fn unfinished_utf8(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let c = b[b.len() - back];
        if c & 0xc0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let need = match c {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// Appends `s` with `& < > " '` escaped.
pub fn escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_colours() {
        let mut a = AnsiHtml::new();
        assert_eq!(
            a.push(b"<b>\x1b[31mred\x1b[0m & \x1b[1;92mok\x1b[m\n"),
            "&lt;b&gt;<span class=\"f1\">red</span> &amp; <span class=\"f10 bold\">ok</span>\n"
        );
    }

    #[test]
    fn any_cut_renders_the_same() {
        let input = "a\x1b[33myellow é€😀\x1b[0m <x>\r\n\x1b[2Kdone".as_bytes();
        let whole = AnsiHtml::new().push(input);
        for cut in 0..input.len() {
            let mut a = AnsiHtml::new();
            let mut got = a.push(&input[..cut]);
            got.push_str(&a.push(&input[cut..]));
            // Spans may be closed and reopened at the cut; the text and its
            // styles are the same.
            let strip = |s: &str| s.replace("</span><span class=\"f3\">", "");
            assert_eq!(strip(&got), strip(&whole), "cut at {cut}");
        }
        assert!(whole.contains("<span class=\"f3\">yellow é€😀</span>"));
        assert!(!whole.contains('\x1b'));
    }
}
