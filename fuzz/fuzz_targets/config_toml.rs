//! The config file (TOML, `[[connectors]]` too) with environment overrides:
//! every problem is an error that names the key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = [(
        "TRIBUTARY_HTTP__MAX_CONNECTIONS".to_owned(),
        text.lines().next().unwrap_or_default().to_owned(),
    )];
    let _ = tributary_gateway::config::Config::from_parts(text, env);
});
