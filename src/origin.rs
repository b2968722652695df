//! Web origins (RFC 6454), in one place: parsing and normalizing the entries of the
//! `allowed_origins` setting ([`parse`], [`parse_list`], [`check_normal`]) and
//! comparing a request's `Origin` header with them ([`allowed`]). Pure functions, no
//! I/O; errors are messages for the configuration error that names the setting.

/// Parse each item as an origin; blank items are skipped and duplicates dropped.
pub fn parse_list<'a>(items: impl Iterator<Item = &'a str>) -> Result<Vec<String>, String> {
    let mut origins: Vec<String> = Vec::new();
    for item in items {
        if let Some(origin) = parse(item)? {
            if !origins.contains(&origin) {
                origins.push(origin);
            }
        }
    }
    Ok(origins)
}

/// One origin, `scheme://host[:port]`, normalized as browsers send it: lower case, the
/// scheme's default port dropped. `Ok(None)` for a blank item.
pub fn parse(item: &str) -> Result<Option<String>, String> {
    let item = item.trim();
    if item.is_empty() {
        return Ok(None);
    }
    let not_origin = |why: &str| format!("{item:?} is not an origin: {why}");
    if item == "*" {
        return Err(not_origin(
            "leave allowed_origins empty to accept any origin",
        ));
    }
    let lower = item.to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://").ok_or_else(|| {
        not_origin("expected scheme://host[:port], such as https://app.example.com")
    })?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err(not_origin("bad scheme"));
    }
    if rest
        .chars()
        .any(|c| matches!(c, '/' | '?' | '#' | '@' | '\\') || c.is_whitespace() || c.is_control())
    {
        return Err(not_origin(
            "an origin has no path, query, user info or trailing slash",
        ));
    }
    let (host, port) = if let Some(after) = rest.strip_prefix('[') {
        let (inside, tail) = after
            .split_once(']')
            .ok_or_else(|| not_origin("unclosed [ in IPv6 host"))?;
        if inside.is_empty()
            || !inside
                .chars()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'))
        {
            return Err(not_origin("bad IPv6 host"));
        }
        let port = match tail {
            "" => None,
            t => Some(
                t.strip_prefix(':')
                    .ok_or_else(|| not_origin("unexpected text after ]"))?,
            ),
        };
        (format!("[{inside}]"), port)
    } else {
        let (host, port) = match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        if host.is_empty() || host.contains(['[', ']']) {
            return Err(not_origin("missing or bad host"));
        }
        (host.to_owned(), port)
    };
    let port = match port {
        None => None,
        Some(p) => {
            let n = if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                p.parse::<u16>().ok().filter(|n| *n != 0)
            };
            Some(n.ok_or_else(|| not_origin("bad port"))?)
        }
    };
    let default_port = match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    Ok(Some(match port {
        Some(p) if Some(p) != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    }))
}

/// `Ok` when `origin` is already what [`parse`] makes of it (lower case, no default
/// port, no blanks): the form [`allowed`] compares against.
///
/// # Errors
/// The reason, when `origin` is not an origin or not in that form.
pub fn check_normal(origin: &str) -> Result<(), String> {
    match parse(origin)? {
        Some(normal) if normal == origin => Ok(()),
        _ => {
            let why = "expected lower case, no default port, no blanks";
            Err(format!("{origin:?} is not in normal form: {why}"))
        }
    }
}

/// True when `origin` is allowed by `allowed`: an empty list allows any; otherwise a
/// present `Origin` must equal an entry as a whole value, ignoring ASCII case (an
/// origin is a scheme, a host and a port, and RFC 6454 serializes scheme and host in
/// lower case, so `HTTPS://App.Example.com` is the origin `https://app.example.com`);
/// `null` and look-alikes such as `http://good.example.evil.com` are refused unless
/// listed. A missing `Origin` is allowed: only browsers send one, and the allow-list
/// exists to stop other sites' pages, not non-browser clients (which could forge it).
pub fn allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    match origin {
        _ if allowed.is_empty() => true,
        None => true,
        Some(o) => allowed.iter().any(|a| a.eq_ignore_ascii_case(o)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_allow_list() {
        let list = vec![
            "https://app.example".to_owned(),
            "http://localhost:3000".to_owned(),
        ];
        assert!(allowed(Some("https://evil.example"), &[]));
        assert!(allowed(None, &[]));
        assert!(allowed(Some("https://app.example"), &list));
        assert!(allowed(Some("http://localhost:3000"), &list));
        // RFC 6454: scheme and host are case-insensitive; the whole value still counts.
        assert!(allowed(Some("https://APP.example"), &list));
        assert!(allowed(Some("HTTP://LocalHost:3000"), &list));
        assert!(allowed(None, &list), "non-browser clients send no Origin");
        for bad in [
            "null",
            "",
            "http://app.example",
            "https://app.example/",
            "https://app.example:443",
            "https://app.example.evil.com",
            "https://evil.com/https://app.example",
            "http://localhost:30001",
            " https://app.example",
        ] {
            assert!(!allowed(Some(bad), &list), "{bad:?}");
        }
    }

    #[test]
    fn parse_normalizes_as_browsers_send() {
        let normal = |item: &str| parse(item).unwrap().unwrap();
        assert_eq!(normal("HTTPS://App.Example.com"), "https://app.example.com");
        assert_eq!(normal(" http://a.example:80 "), "http://a.example");
        assert_eq!(normal("wss://a.example:443"), "wss://a.example");
        assert_eq!(normal("https://a.example:8443"), "https://a.example:8443");
        assert_eq!(normal("http://[::1]:80"), "http://[::1]");
        assert_eq!(normal("chrome-extension://abc"), "chrome-extension://abc");
        assert_eq!(parse("  "), Ok(None));
        for (bad, why) in [
            ("*", "leave allowed_origins empty"),
            ("a.example", "expected scheme://host"),
            ("1http://a", "bad scheme"),
            ("http://a/", "no path"),
            ("http://u@a", "no path, query, user info"),
            ("http://[::1", "unclosed ["),
            ("http://[zz]", "bad IPv6 host"),
            ("http://[::1]x", "unexpected text after ]"),
            ("http://:80", "missing or bad host"),
            ("http://a:0", "bad port"),
            ("http://a:65536", "bad port"),
        ] {
            let msg = parse(bad).unwrap_err();
            assert!(msg.contains(why), "{bad}: {msg}");
        }
    }

    #[test]
    fn lists_skip_blanks_and_duplicates() {
        let items = [
            "http://a.example",
            "",
            "HTTP://A.example:80",
            "http://b.example",
        ];
        assert_eq!(
            parse_list(items.into_iter()),
            Ok(vec!["http://a.example".into(), "http://b.example".into()])
        );
        assert!(parse_list(["http://a.example", "nope"].into_iter()).is_err());
    }

    #[test]
    fn normal_form() {
        assert_eq!(check_normal("https://app.example"), Ok(()));
        for not_normal in [
            "https://App.example",
            "https://app.example:443",
            " https://a.b",
        ] {
            let msg = check_normal(not_normal).unwrap_err();
            assert!(msg.contains("not in normal form"), "{msg}");
        }
        assert!(check_normal("nope").unwrap_err().contains("not an origin"));
    }
}
