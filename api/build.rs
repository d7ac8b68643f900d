fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // The service's client and server only with the `grpc` feature: without it the
    // generated code is the messages alone (prost), with no tonic and so no tokio.
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .compile_protos(&["proto/clusterlink/broker/v1/broker.proto"], &["proto"])?;
    Ok(())
}
