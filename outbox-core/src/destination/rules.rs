//! What makes a destination or a version valid: the one set of rules shared by
//! `Destination::parse` at run time and `#[derive(Publish)]` at compile time
//! (`outbox-derive` includes this file).

/// What a destination string points at, names percent-decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/topic/<routing key>`
    Topic(String),
    /// `/exchange/<exchange>[/<routing key>]`
    Exchange(String, String),
    /// `/queue/<name>` or a bare `<name>`
    Queue(String),
    /// `/amq/queue/<name>`
    AmqQueue(String),
}

/// The longest destination the `published.destination` column holds.
pub(crate) const MAX_LEN: usize = 255;

/// Parse `destination` as RabbitMQ's STOMP plugin would.
pub(crate) fn parse(destination: &str) -> Result<Endpoint, &'static str> {
    if destination.is_empty() {
        return Err("it is empty");
    }
    if destination.len() > MAX_LEN {
        return Err("it is longer than 255 bytes");
    }
    if destination.chars().any(char::is_whitespace) {
        return Err("it contains whitespace");
    }
    let name = |rest: &str, what: &'static str| {
        if rest.is_empty() {
            Err(what)
        } else {
            unescape(rest)
        }
    };
    if let Some(rest) = destination.strip_prefix("/topic/") {
        return Ok(Endpoint::Topic(name(
            rest,
            "the routing key after /topic/ is empty",
        )?));
    }
    if let Some(rest) = destination.strip_prefix("/exchange/") {
        let (exchange, routing_key) = match rest.split_once('/') {
            Some((exchange, routing_key)) => (exchange, unescape(routing_key)?),
            None => (rest, String::new()),
        };
        return Ok(Endpoint::Exchange(
            name(exchange, "the exchange name after /exchange/ is empty")?,
            routing_key,
        ));
    }
    if let Some(rest) = destination.strip_prefix("/amq/queue/") {
        return Ok(Endpoint::AmqQueue(name(
            rest,
            "the queue name after /amq/queue/ is empty",
        )?));
    }
    if let Some(rest) = destination.strip_prefix("/queue/") {
        return Ok(Endpoint::Queue(name(
            rest,
            "the queue name after /queue/ is empty",
        )?));
    }
    if destination.contains('/') {
        return Err("unknown destination prefix");
    }
    Ok(Endpoint::Queue(unescape(destination)?))
}

/// The STOMP plugin percent-decodes names (`%2F` is a `/`).
fn unescape(text: &str) -> Result<String, &'static str> {
    if !text.contains('%') {
        return Ok(text.to_owned());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or("a % is not followed by two hex digits")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-escapes do not decode to UTF-8")
}

/// A version is appended as `.<version>`: it must keep the destination valid.
pub(crate) fn check_version(version: &str) -> Result<(), &'static str> {
    if version.is_empty()
        || version.len() > 100
        || version.contains(['/', '%'])
        || version.chars().any(char::is_whitespace)
    {
        Err("use 1 to 100 characters without whitespace, `/` or `%`, e.g. \"v1\"")
    } else {
        Ok(())
    }
}

/// The advice appended to every destination error.
pub(crate) const ADVICE: &str = "use /topic/<routing-key>, /exchange/<exchange>/<routing-key>, \
                                 /queue/<queue>, /amq/queue/<queue> or a bare queue name";
