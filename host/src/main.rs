fn main() -> std::process::ExitCode {
    cllm::cli::run()
}
