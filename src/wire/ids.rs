//! Typed ids the master and its workers share.

use std::fmt;

/// A step attempt's id: 128 random bits, made by the master when it starts
/// the attempt, stored with the build, and carried by every message about
/// the step. Unique across master restarts and across masters sharing a
/// database (random, not counted), so a worker's held step names exactly
/// one attempt whoever it reconnects to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepId([u8; 16]);

impl StepId {
    /// A new, random id.
    pub fn random() -> StepId {
        let mut id = [0u8; 16];
        rand::fill(&mut id[..]);
        StepId(id)
    }

    /// The id in a message's bytes; `None` unless exactly 16 of them.
    pub fn from_slice(bytes: &[u8]) -> Option<StepId> {
        <[u8; 16]>::try_from(bytes).ok().map(StepId)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// As a message carries it.
    pub fn to_vec(self) -> Vec<u8> {
        self.0.to_vec()
    }
}

impl From<[u8; 16]> for StepId {
    fn from(bytes: [u8; 16]) -> StepId {
        StepId(bytes)
    }
}

/// Lowercase hex, as logs and the console show it.
impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&super::hex(&self.0))
    }
}

impl fmt::Debug for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StepId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ids_are_random_and_read_back_only_from_sixteen_bytes() {
        let (a, b) = (StepId::random(), StepId::random());
        assert_ne!(a, b);
        assert_eq!(StepId::from_slice(&a.to_vec()), Some(a));
        assert_eq!(StepId::from_slice(&[1; 15]), None);
        assert_eq!(StepId::from_slice(&[1; 17]), None);
        assert_eq!(StepId::from([0xab; 16]).to_string(), "ab".repeat(16));
    }
}
