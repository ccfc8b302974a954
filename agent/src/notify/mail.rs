//! Mail targets: SMTP (lettre's async transport) and sendmail.

use std::time::Duration;

use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSendmailTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::config::{SmtpMode, TargetKind};
use super::{Notification, NotifyError};

/// Default sendmail program.
pub const DEFAULT_SENDMAIL: &str = "/usr/sbin/sendmail";

fn message(from: &str, to: &[String], n: &Notification) -> Result<Message, NotifyError> {
    let bad = |what: &str, a: &str, e: &dyn std::fmt::Display| {
        NotifyError::Message(format!("bad {what} address {a:?}: {e}"))
    };
    let mut b = Message::builder()
        .from(from.parse::<Mailbox>().map_err(|e| bad("from", from, &e))?)
        .subject(n.subject())
        .header(ContentType::TEXT_PLAIN);
    for a in to {
        b = b.to(a.parse::<Mailbox>().map_err(|e| bad("to", a, &e))?);
    }
    // 8bit keeps the table readable in any mail client and in a raw mbox;
    // lettre refuses it only for lines over 998 bytes, then picks
    // quoted-printable or base64 itself.
    let text = n.render_text();
    let body = Body::new_with_encoding(text.clone(), ContentTransferEncoding::EightBit)
        .unwrap_or_else(|_| Body::new(text));
    b.body(body)
        .map_err(|e| NotifyError::Message(e.to_string()))
}

/// `host[:port]` → host and port (default 25, or 465 for SMTPS).
fn host_port(server: &str, mode: SmtpMode) -> (String, u16) {
    let default = if mode == SmtpMode::Tls { 465 } else { 25 };
    // [v6]:port, host:port, host
    if let Some(rest) = server.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once(']') {
            let port = p.strip_prefix(':').and_then(|p| p.parse().ok());
            return (h.to_string(), port.unwrap_or(default));
        }
    }
    match server.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h.to_string(), port),
            Err(_) => (server.to_string(), default),
        },
        _ => (server.to_string(), default),
    }
}

pub(super) async fn send(
    kind: &TargetKind,
    n: &Notification,
    deadline: Duration,
) -> Result<(), NotifyError> {
    match kind {
        TargetKind::Smtp {
            server,
            mode,
            username,
            password,
            password_file,
            from,
            to,
        } => {
            let mode = mode.unwrap_or(if username.is_some() {
                SmtpMode::Starttls
            } else {
                SmtpMode::Opportunistic
            });
            let (host, port) = host_port(server, mode);
            let smtp_err = |message: String| NotifyError::Smtp {
                server: format!("{host}:{port}"),
                message,
            };
            let msg = message(from, to, n)?;
            let tls = || {
                TlsParameters::new(host.clone())
                    .map_err(|e| smtp_err(format!("TLS setup: {}", crate::chain(&e))))
            };
            let tls = match mode {
                SmtpMode::Insecure => Tls::None,
                SmtpMode::Opportunistic => Tls::Opportunistic(tls()?),
                SmtpMode::Starttls => Tls::Required(tls()?),
                SmtpMode::Tls => Tls::Wrapper(tls()?),
            };
            let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
                .port(port)
                .timeout(Some(deadline))
                .tls(tls);
            if let Some(user) = username {
                let pass = match (password, password_file) {
                    (Some(p), _) => p.clone(),
                    (None, Some(f)) => std::fs::read_to_string(f)
                        .map_err(|source| NotifyError::Secret {
                            path: f.display().to_string(),
                            source,
                        })?
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                    (None, None) => String::new(),
                };
                b = b.credentials(Credentials::new(user.clone(), pass));
            }
            b.build()
                .send(msg)
                .await
                .map(|_| ())
                .map_err(|e| smtp_err(crate::chain(&e)))
        }
        TargetKind::Sendmail { command, from, to } => {
            let cmd = command.clone().unwrap_or_else(|| DEFAULT_SENDMAIL.into());
            let msg = message(from, to, n)?;
            AsyncSendmailTransport::<Tokio1Executor>::new_with_command(cmd.as_os_str())
                .send(msg)
                .await
                .map_err(|e| NotifyError::Sendmail {
                    command: cmd.display().to_string(),
                    message: crate::chain(&e),
                })
        }
        TargetKind::Webhook { .. } => Err(NotifyError::Message("not a mail target".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_strings_give_host_and_port() {
        assert_eq!(
            host_port("127.0.0.1:2525", SmtpMode::Insecure),
            ("127.0.0.1".into(), 2525)
        );
        assert_eq!(
            host_port("mail.example.org", SmtpMode::Starttls),
            ("mail.example.org".into(), 25)
        );
        assert_eq!(
            host_port("mail.example.org", SmtpMode::Tls),
            ("mail.example.org".into(), 465)
        );
        assert_eq!(host_port("[::1]:587", SmtpMode::Tls), ("::1".into(), 587));
    }
}
