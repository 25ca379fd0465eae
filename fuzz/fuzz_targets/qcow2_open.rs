#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vessel_fuzz::targets::qcow2_open(data);
});
