fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/clusterlink/broker/v1/broker.proto"], &["proto"])?;
    Ok(())
}
