//! Masking step secrets in a step's output, on the worker, before the
//! output is numbered, spilled or sent: what leaves the worker (and so
//! what the master stores) holds `<secret:NAME>` instead of the value.
//!
//! Output arrives in arbitrary pieces, so a secret can be split across two
//! reads (`printf abc; sleep 1; printf def`). A [`Masker`] holds back the
//! shortest tail of what it was given that could still grow into a secret,
//! and lets it go once the next piece shows what it is (or, at the end of
//! the stream, masks it as it is). It holds at most the longest secret's
//! length minus one byte.

/// Replaces secret values in one output stream.
#[derive(Debug)]
pub struct Masker {
    /// (value, replacement), longest value first so a secret that contains
    /// another is replaced whole.
    secrets: Vec<(Vec<u8>, Vec<u8>)>,
    held: Vec<u8>,
}

impl Masker {
    /// A masker for these (name, value) pairs; `None` when there is nothing
    /// to mask (empty values are ignored).
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Option<Self> {
        let mut secrets: Vec<(Vec<u8>, Vec<u8>)> = secrets
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(n, v)| (v.to_vec(), format!("<secret:{n}>").into_bytes()))
            .collect();
        if secrets.is_empty() {
            return None;
        }
        secrets.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Some(Masker {
            secrets,
            held: Vec::new(),
        })
    }

    /// Masks the next piece of the stream: returns what can be passed on
    /// now (possibly nothing) and holds back a tail that may be the start
    /// of a secret.
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let mut input = std::mem::take(&mut self.held);
        input.extend_from_slice(data);
        self.scan(&input, false)
    }

    /// The end of the stream: whatever was held back, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let held = std::mem::take(&mut self.held);
        self.scan(&held, true)
    }

    /// Replaces every secret in `input`; unless at the `end`, holds back
    /// the tail from the first place that may grow into a secret.
    fn scan(&mut self, input: &[u8], end: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        let mut i = 0;
        'scan: while i < input.len() {
            let rest = &input[i..];
            if !end
                && self
                    .secrets
                    .iter()
                    .any(|(value, _)| rest.len() < value.len() && value.starts_with(rest))
            {
                // The rest may be a secret (or a longer one) still arriving.
                self.held = rest.to_vec();
                break;
            }
            for (value, replacement) in &self.secrets {
                if rest.starts_with(value) {
                    out.extend_from_slice(replacement);
                    i += value.len();
                    continue 'scan;
                }
            }
            out.push(input[i]);
            i += 1;
        }
        out
    }

    /// Masks a whole text at once (a start error message).
    pub fn mask_text(&mut self, text: &str) -> String {
        let mut out = self.feed(text.as_bytes());
        out.extend(self.finish());
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker() -> Masker {
        Masker::new([
            ("token", &b"hunter22"[..]),
            ("long", &b"hunter22-and-more"[..]),
        ])
        .unwrap()
    }

    /// Feeds `text` cut at every possible place into two and three pieces;
    /// the output is always the same.
    #[test]
    fn a_secret_is_masked_wherever_the_stream_is_cut() {
        let text = b"pw=hunter22; x=hunter22-and-more; hunter2 hunte";
        let want = b"pw=<secret:token>; x=<secret:long>; hunter2 hunte".to_vec();
        for a in 0..=text.len() {
            for b in a..=text.len() {
                let mut m = masker();
                let mut got = m.feed(&text[..a]);
                got.extend(m.feed(&text[a..b]));
                got.extend(m.feed(&text[b..]));
                got.extend(m.finish());
                assert_eq!(got, want, "cut at {a} and {b}");
            }
        }
    }

    #[test]
    fn only_a_possible_prefix_is_held_back() {
        let mut m = masker();
        assert_eq!(m.feed(b"building... hun"), b"building... ".to_vec());
        assert_eq!(m.feed(b"gry\n"), b"hungry\n".to_vec());
        assert_eq!(m.finish(), Vec::<u8>::new());
        // A short secret that may be the start of a longer one waits, and
        // is masked at the end of the stream.
        assert_eq!(m.feed(b"pw hunter22"), b"pw ".to_vec());
        assert_eq!(m.finish(), b"<secret:token>".to_vec());
        assert!(Masker::new([("e", &b""[..])]).is_none());
        assert_eq!(
            masker().mask_text("cannot start \"hunter22\""),
            "cannot start \"<secret:token>\""
        );
    }
}
