//! Compile-time check of destination strings and versions. It mirrors
//! `outbox_core::Destination::parse`; the test suite checks they agree.

pub(crate) fn check_destination(destination: &str) -> Result<(), String> {
    let problem = if destination.is_empty() {
        Some("it is empty")
    } else if destination.len() > 255 {
        Some("it is longer than 255 bytes")
    } else if destination.chars().any(char::is_whitespace) {
        Some("it contains whitespace")
    } else if destination == "/topic/" {
        Some("the routing key after /topic/ is empty")
    } else if destination == "/exchange/" || destination.starts_with("/exchange//") {
        Some("the exchange name after /exchange/ is empty")
    } else if destination == "/amq/queue/" {
        Some("the queue name after /amq/queue/ is empty")
    } else if destination == "/queue/" {
        Some("the queue name after /queue/ is empty")
    } else if destination.contains('/')
        && !["/topic/", "/exchange/", "/amq/queue/", "/queue/"]
            .iter()
            .any(|prefix| destination.starts_with(prefix))
    {
        Some("unknown destination prefix")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(reason) => Err(format!(
            "invalid destination `{destination}`: {reason}; use /topic/<routing-key>, \
             /exchange/<exchange>/<routing-key>, /queue/<queue>, /amq/queue/<queue> or a bare queue name"
        )),
    }
}

pub(crate) fn check_version(version: &str) -> Result<(), String> {
    if version.is_empty()
        || version.len() > 100
        || version.contains(['/', '%'])
        || version.chars().any(char::is_whitespace)
    {
        Err(format!(
            "invalid version {version:?}: use 1 to 100 characters without whitespace, `/` or `%`, e.g. \"v1\""
        ))
    } else {
        Ok(())
    }
}
