//! What the build master tells whoever listens: the console's `watch`
//! today, and the web UI's live views, the API's event stream and the
//! metrics as they come. This is the domain's own type: each front end turns
//! it into its wire type (the console's is `DebugEvent`), and the domain
//! never speaks one.
//!
//! Events go out on a broadcast channel ([`super::BuildMaster::subscribe`]):
//! a listener that falls behind misses events (and is told so by the
//! channel), it never slows a build.

use std::fmt;

/// How a step or a build ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    /// A step exited non-zero, was killed by a signal, timed out or could
    /// not start.
    Failure,
    /// The worker was lost, or the master could not record the build.
    Exception,
    /// An operator stopped it.
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Exception => "exception",
            Outcome::Interrupted => "interrupted",
        }
    }

    /// The outcome a stored result names (anything unknown is an
    /// exception: it is not a success).
    pub fn parse(s: &str) -> Outcome {
        match s {
            "success" => Outcome::Success,
            "failure" => Outcome::Failure,
            "interrupted" => Outcome::Interrupted,
            _ => Outcome::Exception,
        }
    }
}

/// Exactly one of the four names; anything else is refused (what a user
/// typed, e.g. an API filter).
impl std::str::FromStr for Outcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Outcome, String> {
        [
            Outcome::Success,
            Outcome::Failure,
            Outcome::Exception,
            Outcome::Interrupted,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
        .ok_or_else(|| {
            format!("{s:?} is not a result: one of success, failure, exception, interrupted")
        })
    }
}

/// One of the four names.
impl<'de> serde::Deserialize<'de> for Outcome {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Outcome, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// As its name.
impl serde::Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened in the build master. (Serialized only to relay
/// it to the other masters sharing a database, see `relay`.)
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    WorkerConnected {
        worker: String,
        session_id: String,
    },
    WorkerLost {
        worker: String,
        reason: String,
    },
    BuildStarted {
        build: i64,
        builder: String,
        worker: String,
    },
    StepStarted {
        build: i64,
        step: String,
        attempt: u32,
    },
    StepEnded {
        build: i64,
        step: String,
        attempt: u32,
        outcome: Outcome,
        detail: String,
    },
    BuildEnded {
        build: i64,
        builder: String,
        outcome: Outcome,
    },
    /// Output of a step is stored (durable): `bytes` more of the step
    /// attempt whose row is `step`.
    OutputStored {
        build: i64,
        step: i64,
        bytes: u64,
    },
    /// A reload applied; what it changed.
    Reloaded {
        summary: String,
    },
}

/// An event and when it happened (Unix milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamped {
    pub unix_ms: i64,
    pub event: Event,
    /// It happened on another master sharing the database, and was relayed
    /// to this one (a build running there, seen live here).
    #[serde(skip)]
    pub elsewhere: bool,
}
