//! A FinHub session token and what the sidecar derives from it: its expiry (the JWT `exp` on
//! FinHub's clock, `expires_in` as fallback and bound), the header values built once.

use super::*;

/// One FinHub session token and what the sidecar derived from it.
pub struct Session {
    /// The token itself.
    pub token: Secret,
    /// `Bearer <token>`, built once, marked sensitive.
    pub authorization: HeaderValue,
    /// The token as a header value (`X-User-Session-Token`), marked sensitive.
    pub session_token: HeaderValue,
    /// `X-Session-ID` for this session: the login's `sessionId`, else a UUID per login (A14).
    pub session_id: HeaderValue,
    /// When the request that obtained it was sent (our clock).
    pub obtained_at: SystemTime,
    /// When its answer arrived (our clock).
    pub received_at: SystemTime,
    /// The validity FinHub granted: the JWT's `exp - iat`, else `expires_in`. FinHub's refresh
    /// window is the last tenth of it.
    pub validity: Duration,
    /// `internalTokenKey` claim, needed to refresh (A3).
    pub internal_token_key: Option<Secret>,
    /// `refreshToken` from the login, kept but unused (A2).
    pub refresh_token: Option<Secret>,
    /// Publication number within its tenant (1 for the first session), set when published.
    pub generation: u64,
    /// Expiry, µs since the epoch: on FinHub's clock if `on_finhub_clock`, else on ours.
    pub(super) expiry_us: AtomicI64,
    /// Whether `expiry_us` is FinHub's `exp` (JWT) rather than `expires_in` from our clock.
    pub(super) on_finhub_clock: bool,
    /// Whether the JWT has both `iat` and `exp`, so FinHub's window is known exactly.
    pub(super) window_known: bool,
    /// Valid at least until here, our clock, µs, whatever FinHub's clock says: FinHub's own
    /// count of what was left (`expires_in`, a "not refreshed" answer) from before it answered.
    pub(super) valid_until_at_least_us: AtomicI64,
    /// Valid at most until here, our clock, µs: that count (floored to whole seconds) plus a
    /// second from when its answer arrived.
    pub(super) valid_until_at_most_us: AtomicI64,
    pub(super) clock: Arc<ClockOffset>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("session_id", &self.session_id)
            .field("expires_at", &self.expires_at())
            .field("refreshable", &self.internal_token_key.is_some())
            .finish_non_exhaustive()
    }
}

/// Where a session's expiry comes from (pure; [`Session::from_grant`] uses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Expiry {
    /// µs since the epoch.
    pub(super) at_us: i64,
    /// On FinHub's clock (JWT `exp`) rather than ours (`expires_in`).
    pub(super) on_finhub_clock: bool,
    /// FinHub's validity (`exp - iat`, else `expires_in`), µs.
    pub(super) validity_us: i64,
    /// `exp` was later than `expires_in` allows and was capped.
    pub(super) capped: bool,
}

/// The expiry rule (§4.3, issue 14): the JWT `exp` is the truth. `expires_in` is whole seconds
/// counted when FinHub answered, so the token lives up to a second longer than it says: it is
/// not a reason to expire early, only a sanity bound on an `exp` far beyond it. Without `exp`,
/// `expires_in` from the moment the request was sent; without either, a fallback lifetime.
pub(super) fn choose_expiry(
    claims: &Claims,
    expires_in: Option<Duration>,
    sent: SystemTime,
    received: SystemTime,
    offset: OffsetBounds,
) -> Expiry {
    let (sent, received) = (unix_us(sent), unix_us(received));
    match (claims.exp.map(unix_us), expires_in.map(us)) {
        (Some(exp), expires_in) => {
            // Latest FinHub time of the answer, plus what it said was left.
            let bound = expires_in.map(|e| {
                received
                    .saturating_add(offset.hi_us)
                    .saturating_add(e)
                    .saturating_add(1_000_000 + us(EXPIRY_SANITY_SLACK))
            });
            let latest = received
                .saturating_add(offset.hi_us)
                .saturating_add(us(grant::MAX_LIFETIME));
            let cap = bound.unwrap_or(latest).min(latest);
            let at_us = exp.min(cap);
            let validity_us = match (claims.iat.map(unix_us), expires_in) {
                (Some(iat), _) if iat < exp => exp - iat,
                (_, Some(e)) => e,
                _ => exp - sent.saturating_add(offset.mid_us()),
            };
            Expiry {
                at_us,
                on_finhub_clock: true,
                // Like every lifetime believed from FinHub, at most a day.
                validity_us: validity_us.clamp(0, us(grant::MAX_LIFETIME)),
                capped: at_us < exp,
            }
        }
        (None, Some(e)) => Expiry {
            at_us: sent.saturating_add(e),
            on_finhub_clock: false,
            validity_us: e,
            capped: false,
        },
        (None, None) => Expiry {
            at_us: sent.saturating_add(us(FALLBACK_LIFETIME)),
            on_finhub_clock: false,
            validity_us: us(FALLBACK_LIFETIME),
            capped: false,
        },
    }
}

impl Session {
    /// Builds a session from a grant whose request was sent at `sent` and answered at
    /// `received` (our clock); `clock` is FinHub's clock as estimated so far (the answer's
    /// own `Date` already included).
    pub fn from_grant(
        grant: Grant,
        sent: SystemTime,
        received: SystemTime,
        clock: &Arc<ClockOffset>,
    ) -> Session {
        let claims = Claims::of(grant.token.expose());
        let expiry = choose_expiry(
            &claims,
            grant.expires_in,
            sent,
            received,
            clock.bounds_at(received),
        );
        if expiry.capped {
            tracing::warn!(
                "the token's exp is later than the answer's expires_in allows; using expires_in"
            );
        }
        let session_id = grant
            .session_id
            .or(claims.session_id)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        Session {
            authorization: sensitive(&format!("Bearer {}", grant.token.expose())),
            session_token: sensitive(grant.token.expose()),
            session_id: HeaderValue::from_str(&session_id)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid-session-id")),
            token: grant.token,
            obtained_at: sent,
            received_at: received,
            validity: Duration::from_micros(expiry.validity_us.max(0) as u64),
            internal_token_key: claims.internal_token_key,
            refresh_token: grant.refresh_token,
            generation: 0,
            expiry_us: AtomicI64::new(expiry.at_us),
            on_finhub_clock: expiry.on_finhub_clock,
            window_known: expiry.on_finhub_clock && claims.iat.is_some() && !expiry.capped,
            valid_until_at_least_us: AtomicI64::new(
                grant
                    .expires_in
                    .map_or(i64::MIN, |e| unix_us(sent).saturating_add(us(e))),
            ),
            valid_until_at_most_us: AtomicI64::new(grant.expires_in.map_or(i64::MAX, |e| {
                unix_us(received)
                    .saturating_add(us(e))
                    .saturating_add(1_000_000)
            })),
            clock: clock.clone(),
        }
    }

    pub(super) fn timing(&self) -> Timing {
        Timing {
            expiry_us: self.expiry_us.load(Ordering::SeqCst),
            on_finhub_clock: self.on_finhub_clock,
            validity_us: us(self.validity),
            at_least_us: self.valid_until_at_least_us.load(Ordering::SeqCst),
            at_most_us: self.valid_until_at_most_us.load(Ordering::SeqCst),
        }
    }

    /// Whether the token may still be sent at `now`: it is valid at FinHub for at least the
    /// expiry margin more, whatever FinHub's clock offset within its known bounds.
    pub fn is_usable(&self, now: SystemTime) -> bool {
        let t = self.timing();
        unix_us(now) < t.usable_until_us(self.clock.hi_us(now))
    }

    /// When FinHub considers the token expired, on our clock (earliest estimate).
    pub fn expires_at(&self) -> SystemTime {
        let t = self.timing();
        let hi = if t.on_finhub_clock {
            self.clock.hi_us(SystemTime::now())
        } else {
            0
        };
        from_unix_us(t.expiry_us.saturating_sub(hi))
    }

    /// The JWT's `exp` (on FinHub's clock), if the expiry comes from it.
    pub fn finhub_expiry(&self) -> Option<SystemTime> {
        self.on_finhub_clock
            .then(|| from_unix_us(self.expiry_us.load(Ordering::SeqCst)))
    }

    /// The validity FinHub granted (see [`Session::validity`]).
    pub fn lifetime(&self) -> Duration {
        self.validity
    }

    /// FinHub's refresh window opens here, on FinHub's clock (µs), when that is known exactly.
    pub(super) fn window_opens_us(&self) -> Option<i64> {
        self.window_known.then(|| self.timing().window_opens_us())
    }

    /// Whether FinHub may still consider the token valid at `now` (something to log out).
    pub(super) fn may_be_valid(&self, now: SystemTime) -> bool {
        let t = self.timing();
        let lo = if t.on_finhub_clock {
            self.clock.bounds_at(now).lo_us
        } else {
            0
        };
        unix_us(now) < t.expiry_us.saturating_sub(lo)
    }

    /// A "not refreshed, still valid" answer said `remaining` (whole seconds, floored) was
    /// left when FinHub answered a request sent at `sent` and received at `received`. For an
    /// opaque token that is its new expiry; for a JWT, whose `exp` stays the truth, a bound:
    /// an `exp` beyond what FinHub now says is capped, as at login.
    pub(super) fn note_remaining(
        &self,
        remaining: Duration,
        sent: SystemTime,
        received: SystemTime,
    ) {
        let r = us(remaining);
        // FinHub's latest count supersedes the earlier one (its clock may have been stepped
        // since: the token then lives longer or shorter on ours).
        self.valid_until_at_least_us
            .store(unix_us(sent).saturating_add(r), Ordering::SeqCst);
        self.valid_until_at_most_us.store(
            unix_us(received)
                .saturating_add(r)
                .saturating_add(1_000_000),
            Ordering::SeqCst,
        );
        if self.on_finhub_clock {
            let bound = unix_us(received)
                .saturating_add(self.clock.hi_us(received))
                .saturating_add(r)
                .saturating_add(1_000_000 + us(EXPIRY_SANITY_SLACK));
            if self.expiry_us.fetch_min(bound, Ordering::SeqCst) > bound {
                tracing::warn!(
                    "FinHub reports less validity left than the token's exp; using its answer"
                );
            }
        } else {
            self.expiry_us
                .store(unix_us(sent).saturating_add(r), Ordering::SeqCst);
        }
    }
}

pub(super) fn sensitive(v: &str) -> HeaderValue {
    // A token with bytes that are not valid in a header cannot be sent; an empty value makes
    // FinHub answer 401, which is the right failure.
    let mut h = HeaderValue::from_str(v).unwrap_or_else(|_| HeaderValue::from_static(""));
    h.set_sensitive(true);
    h
}

/// A session's times, for the planning arithmetic (µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timing {
    pub(super) expiry_us: i64,
    pub(super) on_finhub_clock: bool,
    pub(super) validity_us: i64,
    /// Our-clock bounds from FinHub's own counts (`i64::MIN` / `i64::MAX`: none).
    pub(super) at_least_us: i64,
    pub(super) at_most_us: i64,
}

impl Timing {
    pub(super) fn margin_us(&self) -> i64 {
        us(EXPIRY_MARGIN).min(self.validity_us / 50)
    }

    /// The last moment (our clock) the token may be sent, given the offset's upper bound,
    /// kept within what FinHub's own count of the remaining validity guarantees: a `Date` far
    /// off (a stepped clock, a cached answer) can neither expire a token FinHub said has time
    /// left nor keep one past what it said.
    pub(super) fn usable_until_us(&self, hi_us: i64) -> i64 {
        let hi = if self.on_finhub_clock { hi_us } else { 0 };
        let margin = self.margin_us();
        self.expiry_us
            .saturating_sub(hi)
            .max(self.at_least_us)
            .min(self.at_most_us)
            .saturating_sub(margin)
    }

    /// FinHub's 10 % window opens here (on the expiry's clock).
    pub(super) fn window_opens_us(&self) -> i64 {
        self.expiry_us - self.validity_us / 10
    }
}
