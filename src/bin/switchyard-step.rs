//! The step supervisor and the step host on their own: `switchyard-step
//! [__step] --parent PID --stdin|--host`.
//!
//! The worker runs every step under a supervisor that dies with the worker
//! and takes the step's process group with it (see
//! `switchyard::worker::step`). `switchyard __step` does the same job, but
//! starting the whole `switchyard` program for each step costs about a
//! millisecond more than starting this small one, which holds nothing but
//! the supervisor; the worker uses this one when it is installed beside
//! `switchyard`.
#![forbid(unsafe_code)]

fn main() {
    // Started as `switchyard __step` is (the worker passes the same words
    // to either).
    let args: Vec<String> = std::env::args()
        .skip(1)
        .skip_while(|a| a == "__step")
        .collect();
    let code = match &args[..] {
        [flag, parent, how] if flag == "--parent" && how == "--stdin" => match parent.parse() {
            Ok(parent) => switchyard::worker::step::supervise_from_stdin(parent),
            Err(_) => 125,
        },
        [flag, parent, how] if flag == "--parent" && how == "--host" => match parent.parse() {
            Ok(parent) => switchyard::worker::host::serve(parent),
            Err(_) => 125,
        },
        _ => {
            eprintln!(
                "usage: switchyard-step --parent PID --stdin|--host (started by `switchyard worker`, not by hand)"
            );
            125
        }
    };
    std::process::exit(code);
}
