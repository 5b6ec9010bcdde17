//! Generates the prost types from `protos/relay.proto` with protox (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=protos/relay.proto");
    let fds = protox::compile(["protos/relay.proto"], ["protos"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
