#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vessel_fuzz::targets::virtio_pmem(data);
});
