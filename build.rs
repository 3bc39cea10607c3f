//! Compiles the protocol's `.proto` files with a vendored `protoc`, so a fresh
//! machine needs nothing installed by hand.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // set_var is unsafe in edition 2024: hand the path to prost-build directly.
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    let protos = ["proto/switchyard/v1/handshake.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    config.compile_protos(&protos, &["proto"])?;
    Ok(())
}
