#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cllm::fuzz_targets::model_config(data));
