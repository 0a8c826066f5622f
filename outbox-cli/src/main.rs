fn main() {
    outbox_cli::main();
}
