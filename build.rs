//! Compiles the protocol's `.proto` files with a vendored `protoc`, so a fresh
//! machine needs nothing installed by hand.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/switchyard/v1/handshake.proto",
        "proto/switchyard/v1/change_source.proto",
        "proto/switchyard/v1/worker.proto",
        "proto/switchyard/v1/debug.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // set_var is unsafe in edition 2024: hand the path to prost-build directly.
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Output chunks are handed on and kept until acknowledged: share them
    // instead of copying.
    config.bytes([".switchyard.v1.StepOutput.data"]);
    // A step secret's value never reaches a log through `{:?}`: its Debug
    // is written by hand (in lib.rs) and shows the name only.
    config.skip_debug([".switchyard.v1.StepSecret"]);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("switchyard_descriptor.bin"))
        .compile_with_config(
            config,
            &protos.map(PathBuf::from),
            &[PathBuf::from("proto"), well_known],
        )?;
    Ok(())
}
