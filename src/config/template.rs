//! Buildbot's interpolation syntax in step fields: `%(prop:NAME)s`,
//! `%(prop:NAME:-default)s` (the default when unset), `%(prop:NAME:+text)s`
//! (the text when set, else nothing), and `%(secret:NAME)s` (a value of the
//! secrets file's `[step_secrets]`). A `%` not followed by `(` is itself,
//! and `%%(` is a literal `%(`, so `date +%Y` needs no escaping. Values are
//! data, never code: in a `shell` line each interpolated value goes in
//! single-quoted. The syntax is checked when the config is read; values are
//! filled in when a step starts.

/// Why a template could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("malformed interpolation at byte {at}: {why} (write %(prop:NAME)s)")]
    Malformed { at: usize, why: &'static str },
    #[error("the build has no property `{0}` (give a default: %(prop:{0}:-default)s)")]
    Missing(String),
    #[error("no step secret `{0}` (add it to `[step_secrets]` in the secrets file)")]
    MissingSecret(String),
    #[error("a secret cannot have `:-` or `:+` (write %(secret:NAME)s)")]
    SecretAlternative,
}

/// One piece of a template.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Prop {
        name: &'a str,
        /// `:-default` or `:+if_set`.
        alt: Option<(char, &'a str)>,
    },
    Secret(&'a str),
}

fn parse(template: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = template;
    let mut offset = 0;
    while let Some(i) = rest.find("%(") {
        // `%%(` is a literal `%(`.
        if i > 0 && rest.as_bytes()[i - 1] == b'%' {
            pieces.push(Piece::Text(&rest[..i - 1]));
            pieces.push(Piece::Text("%("));
            rest = &rest[i + 2..];
            offset += i + 2;
            continue;
        }
        pieces.push(Piece::Text(&rest[..i]));
        let at = offset + i;
        let body_start = i + 2;
        let Some(close) = rest[body_start..].find(")s") else {
            return Err(TemplateError::Malformed {
                at,
                why: "no closing `)s`",
            });
        };
        let body = &rest[body_start..body_start + close];
        if body.contains("%(") {
            return Err(TemplateError::Malformed {
                at,
                why: "no closing `)s` before the next `%(`",
            });
        }
        let (kind, spec) = body.split_once(':').ok_or(TemplateError::Malformed {
            at,
            why: "expected `prop:` or `secret:`",
        })?;
        let (name, alt) = match spec.find([':']) {
            Some(j) => {
                let (name, tail) = spec.split_at(j);
                let tail = &tail[1..];
                match tail.chars().next() {
                    Some(c @ ('-' | '+')) => (name, Some((c, &tail[1..]))),
                    _ => {
                        return Err(TemplateError::Malformed {
                            at,
                            why: "after the name, only `:-default` or `:+text`",
                        });
                    }
                }
            }
            None => (spec, None),
        };
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '(') {
            return Err(TemplateError::Malformed {
                at,
                why: "not a property name",
            });
        }
        match kind {
            "prop" => pieces.push(Piece::Prop { name, alt }),
            "secret" if alt.is_some() => return Err(TemplateError::SecretAlternative),
            "secret" => pieces.push(Piece::Secret(name)),
            _ => {
                return Err(TemplateError::Malformed {
                    at,
                    why: "expected `prop:` or `secret:`",
                });
            }
        }
        let consumed = body_start + close + 2;
        rest = &rest[consumed..];
        offset += consumed;
    }
    pieces.push(Piece::Text(rest));
    Ok(pieces)
}

/// Checks a template's syntax (config validation).
pub fn check(template: &str) -> Result<(), TemplateError> {
    parse(template).map(|_| ())
}

/// The secrets a (well-formed) template names, in order.
pub fn secrets_in(template: &str) -> Vec<&str> {
    parse(template)
        .map(|pieces| {
            pieces
                .into_iter()
                .filter_map(|p| match p {
                    Piece::Secret(name) => Some(name),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Quotes a value for `sh`: one single-quoted word, whatever it holds.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Fills a template: properties from `lookup`, secrets from `secret`. With
/// `shell`, every interpolated value is shell-quoted (it is data, never
/// code).
pub fn render<'a, 'b>(
    template: &str,
    lookup: impl Fn(&str) -> Option<&'a str>,
    secret: impl Fn(&str) -> Option<&'b str>,
    shell: bool,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    for piece in parse(template)? {
        let value = match piece {
            Piece::Text(t) => {
                out.push_str(t);
                continue;
            }
            Piece::Prop { name, alt } => match (lookup(name), alt) {
                (Some(v), None) | (Some(v), Some(('-', _))) => v.to_string(),
                (Some(_), Some((_, text))) => text.to_string(),
                (None, Some(('-', default))) => default.to_string(),
                (None, Some(_)) => String::new(),
                (None, None) => return Err(TemplateError::Missing(name.to_string())),
            },
            Piece::Secret(name) => secret(name)
                .ok_or_else(|| TemplateError::MissingSecret(name.to_string()))?
                .to_string(),
        };
        if shell {
            out.push_str(&shell_quote(&value));
        } else {
            out.push_str(&value);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(
        template: &str,
        props: impl Fn(&str) -> Option<&'static str>,
        shell: bool,
    ) -> Result<String, TemplateError> {
        super::render(template, props, |_| None, shell)
    }

    fn props() -> impl Fn(&str) -> Option<&'static str> + Copy {
        |name| match name {
            "branch" => Some("release"),
            "evil" => Some("x';touch pwned;'"),
            _ => None,
        }
    }

    #[test]
    fn renders_buildbot_syntax() {
        let p = props();
        assert_eq!(render("b=%(prop:branch)s", p, false).unwrap(), "b=release");
        assert_eq!(render("%(prop:nope:-dflt)s", p, false).unwrap(), "dflt");
        assert_eq!(render("%(prop:branch:+yes)s", p, false).unwrap(), "yes");
        assert_eq!(render("%(prop:nope:+yes)s", p, false).unwrap(), "");
        assert_eq!(render("date +%Y 100%", p, false).unwrap(), "date +%Y 100%");
        assert_eq!(
            render("%%(prop:branch)s", p, false).unwrap(),
            "%(prop:branch)s"
        );
        assert_eq!(
            render("%(prop:nope)s", p, false),
            Err(TemplateError::Missing("nope".into()))
        );
        assert_eq!(
            render("echo %(prop:evil)s", p, true).unwrap(),
            r"echo 'x'\'';touch pwned;'\'''"
        );
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in [
            "%(prop:x",
            "%(x)s",
            "%(prop:)s",
            "%(prop:a:b)s",
            "%(env:HOME)s",
        ] {
            assert!(
                matches!(check(bad), Err(TemplateError::Malformed { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            check("%(secret:token:-x)s"),
            Err(TemplateError::SecretAlternative)
        );
        assert!(check("plain text, 100% fine").is_ok());
    }

    #[test]
    fn secrets_are_named_and_filled_in() {
        let t = "git clone https://ci:%(secret:token)s@h/r %(prop:branch)s";
        assert_eq!(secrets_in(t), vec!["token"]);
        let secret = |n: &str| (n == "token").then_some("s3cr3t");
        assert_eq!(
            super::render(t, props(), secret, true).unwrap(),
            "git clone https://ci:'s3cr3t'@h/r 'release'"
        );
        assert_eq!(
            super::render("%(secret:other)s", props(), secret, false),
            Err(TemplateError::MissingSecret("other".into()))
        );
    }
}
