//! Shared by the tools: errors go to stderr as one line chain, with exit code 1
//! (no backtrace dump even where RUST_BACKTRACE is set).

pub fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
