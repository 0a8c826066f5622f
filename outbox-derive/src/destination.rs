//! Compile-time checks of destinations and versions, with the very rules
//! `outbox_core::Destination::parse` applies at run time.

#[allow(dead_code)]
#[path = "../../outbox-core/src/destination/rules.rs"]
mod rules;

pub(crate) fn check_destination(destination: &str) -> Result<(), String> {
    rules::parse(destination).map(drop).map_err(|reason| {
        // Same text as `outbox_core::Error::InvalidDestination`, minus an empty "``".
        let shown = if destination.is_empty() {
            String::new()
        } else {
            format!(" `{destination}`")
        };
        format!("invalid destination{shown}: {reason}; {}", rules::ADVICE)
    })
}

pub(crate) fn check_version(version: &str) -> Result<(), String> {
    rules::check_version(version).map_err(|reason| format!("invalid version {version:?}: {reason}"))
}
