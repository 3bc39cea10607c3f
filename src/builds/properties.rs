//! Build properties.
//!
//! Every build has named properties, each with the source it came from.
//! Sources are applied in a fixed order and a later one overrides an
//! earlier one: change, scheduler, force, build, worker, step. Step fields
//! use them through `%(prop:NAME)s` ([`crate::config::template`]).

use std::collections::BTreeMap;

use crate::config::StepSecrets;
use crate::config::template::{self, TemplateError};

/// Where a property came from, in the order sources apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Change,
    Scheduler,
    Force,
    Build,
    Worker,
    Step,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Change => "change",
            Source::Scheduler => "scheduler",
            Source::Force => "force",
            Source::Build => "build",
            Source::Worker => "worker",
            Source::Step => "step",
        }
    }

    pub fn parse(s: &str) -> Option<Source> {
        Some(match s {
            "change" => Source::Change,
            "scheduler" => Source::Scheduler,
            "force" => Source::Force,
            "build" => Source::Build,
            "worker" => Source::Worker,
            "step" => Source::Step,
            _ => return None,
        })
    }
}

/// A build's properties: name to (value, source).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties(BTreeMap<String, (String, Source)>);

impl Properties {
    /// Sets a property unless a later source already set it.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>, source: Source) {
        let name = name.into();
        if self.0.get(&name).is_some_and(|(_, s)| *s > source) {
            return;
        }
        self.0.insert(name, (value.into(), source));
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|(v, _)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, Source)> {
        self.0
            .iter()
            .map(|(k, (v, s))| (k.as_str(), v.as_str(), *s))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Fills a step field from these properties and `secrets`; with
    /// `shell`, every value goes in shell-quoted.
    pub fn render(
        &self,
        template: &str,
        secrets: &StepSecrets,
        shell: bool,
    ) -> Result<String, TemplateError> {
        template::render(template, |n| self.get(n), |n| secrets.get(n), shell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_sources_win_and_values_are_quoted_in_shell() {
        let mut p = Properties::default();
        p.set("branch", "main", Source::Change);
        p.set("branch", "release", Source::Force);
        p.set("branch", "ignored", Source::Change);
        assert_eq!(p.get("branch"), Some("release"));
        assert_eq!(
            p.render("b=%(prop:branch)s", &StepSecrets::default(), false)
                .unwrap(),
            "b=release"
        );
        assert_eq!(
            p.render("echo %(prop:branch)s", &StepSecrets::default(), true)
                .unwrap(),
            "echo 'release'"
        );
    }
}
