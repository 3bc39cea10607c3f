//! Advice to the kernel about the page cache, for files written as
//! streams (step logs, uploads on the master; downloads on a worker).
//!
//! Such files are written once and rarely read back soon. Left cached,
//! a 1 GiB artifact takes 1 GiB of memory that other work must then
//! reclaim, and each new page costs more than a reused one: on the virtual
//! machines CI runs on, writing 1 GiB into fresh pages ran at 400 MB/s,
//! against 2.7 GB/s with the written pages let go of as it went
//! (BENCHMARKS.md, issue 14). All of this is advice: a failure changes
//! nothing written, so it is ignored.

use std::fs::File;

/// The page size the ranges let go of are rounded to.
const PAGE: u64 = 4096;

/// Starts writing `len` bytes of `file` from `from` back to disk, without
/// waiting: on Linux, `POSIX_FADV_DONTNEED` starts the writeback of dirty
/// pages, and drops none of them (they are dirty).
pub fn start_writeback(file: &File, from: u64, len: u64) {
    let _ = advise_dontneed(file, from, len);
}

/// Lets the kernel drop `file`'s pages from `*released` up to `upto`
/// (rounded down to a page), pages written back already; moves
/// `*released` on.
pub fn release(file: &File, released: &mut u64, upto: u64) {
    let to = upto & !(PAGE - 1);
    if to > *released && advise_dontneed(file, *released, to - *released) {
        *released = to;
    }
}

fn advise_dontneed(file: &File, from: u64, len: u64) -> bool {
    nix::fcntl::posix_fadvise(
        file,
        from as i64,
        len as i64,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .is_ok()
}
