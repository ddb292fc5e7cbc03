//! The `partner-bridge` binary: parse the command line, hand over to the library.
#![forbid(unsafe_code)]

fn main() {
    println!("partner-bridge {}", env!("CARGO_PKG_VERSION"));
}
