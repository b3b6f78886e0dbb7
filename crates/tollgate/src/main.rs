//! The `tollgate` binary: parse the command line, run the command, map the
//! outcome to an exit code. Everything else lives in the library half.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = tollgate::cli::Cli::parse();
    let default_level = match cli.command {
        tollgate::cli::Command::Serve | tollgate::cli::Command::MockUpstream { .. } => "info",
        _ => "warn",
    };
    tollgate::telemetry::init(cli.log_format, default_level);
    match tollgate::commands::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", tollgate::commands::one_line(&error));
            ExitCode::from(tollgate::commands::exit_code(&error))
        }
    }
}
