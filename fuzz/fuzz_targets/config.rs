//! The config parser on arbitrary text: it returns a config whose every value is within the
//! documented limits, or errors that each point inside the text; it never panics.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portshard_core::config::{Config, MAX_LISTENERS, MAX_SERVICES, MAX_WORKERS};

fuzz_target!(|text: &str| {
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            assert!(!config.services.is_empty() && config.services.len() <= MAX_SERVICES);
            for service in &config.services {
                assert!(portshard_core::service::is_valid_name(&service.name));
                assert!((1..=MAX_WORKERS).contains(&service.workers));
                assert!(service.listen.port() != 0);
                // The first listener is `proto` and `listen`; at most one of each kind.
                assert!((1..=MAX_LISTENERS).contains(&service.listeners.len()));
                assert_eq!(
                    (service.listeners[0].proto, service.listeners[0].addr),
                    (service.proto, service.listen)
                );
                for (i, listener) in service.listeners.iter().enumerate() {
                    assert!(listener.addr.port() != 0);
                    assert!(service.listeners[..i].iter().all(|l| l.kind() != listener.kind()));
                }
                assert!(service.command.first().is_some_and(|p| !p.is_empty()));
                assert!(service.run_as.as_ref().is_none_or(|r| !r.user.is_empty()));
            }
        }
        Err(error) => {
            assert!(!error.problems.is_empty());
            let lines = text.split('\n').count();
            for problem in &error.problems {
                assert!(problem.line <= lines, "{error}");
            }
            // The report renders whatever the problems hold.
            let _ = error.to_string();
        }
    }
});
