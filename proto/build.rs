//! Compiles `proto/treaty/v1/treaty.proto` with protox (pure Rust), so no system `protoc` is needed,
//! and writes the encoded `FileDescriptorSet` (with its imports) that gRPC server reflection serves
//! (`treaty_proto::FILE_DESCRIPTOR_SET`).

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["treaty/v1/treaty.proto"], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("treaty_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
