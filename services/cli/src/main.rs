use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = herald_cli::Cli::parse();
    let shutdown = herald_shared::shutdown::on_signals();
    match herald_cli::run(cli, shutdown, &mut std::io::stdout()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error message already carries its cause; an operator needs no backtrace.
            eprintln!("herald: {e}");
            ExitCode::FAILURE
        }
    }
}
