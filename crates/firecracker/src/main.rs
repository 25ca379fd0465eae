//! `firecracker`: Vessel's Firecracker drop-in, Firecracker mode and nothing else (see
//! `vessel_firecracker::cli::firecracker_main`).

fn main() -> std::process::ExitCode {
    vessel_firecracker::cli::firecracker_main()
}
