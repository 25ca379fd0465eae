//! Builds a guest image with vessel-image alone (without the vessel CLI):
//! `cargo run -p vessel-image --example build_image -- debian|minimal`.

use std::time::Instant;

fn main() {
    let Some(arg) = std::env::args().nth(1) else {
        eprintln!("usage: build_image debian|minimal");
        std::process::exit(2);
    };
    let name: vessel_image::ImageName = match arg.parse() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let start = Instant::now();
    let mut log = |line: &str| println!("[{:7.1}s] {line}", start.elapsed().as_secs_f64());
    match vessel_image::build(name, &mut log) {
        Ok(paths) => {
            println!(
                "image {name} ready in {:.1}s",
                start.elapsed().as_secs_f64()
            );
            let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            println!(
                "kernel     {} ({} bytes)",
                paths.kernel.display(),
                size(&paths.kernel)
            );
            println!(
                "initrd     {} ({} bytes)",
                paths.initrd.display(),
                size(&paths.initrd)
            );
            if let Some(map) = &paths.system_map {
                println!("System.map {} ({} bytes)", map.display(), size(map));
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
