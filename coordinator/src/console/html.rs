//! The console's HTML, rendered on the server from the views. Every value that comes from the
//! outside world (labels, GIDs, shard names, errors, reasons, operators) goes through [`escape`];
//! nothing else builds markup. Each page's changing part is its *live* region, rendered by the
//! same function for the first load and for the refreshes the page's script asks for.

use std::fmt::Write;

use super::views::{
    Filters, HeuristicView, InDoubtList, InDoubtView, StateFilter, TransactionDetail, TransactionList,
    TransactionView,
};

/// Text made safe for HTML content and double- or single-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Query-string component encoding, for links that carry a filter value.
fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// `2026-12-06 08:15:02.123 UTC`.
pub fn timestamp(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || format!("unix ms {ms}"),
            |time| time.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string(),
        )
}

/// `850 ms`, `12.3 s`, `4 min 05 s`, `3 h 02 min`.
pub fn duration(ms: u64) -> String {
    let seconds = ms / 1000;
    if ms < 1000 {
        format!("{ms} ms")
    } else if seconds < 60 {
        format!("{}.{} s", seconds, (ms % 1000) / 100)
    } else if seconds < 3600 {
        format!("{} min {:02} s", seconds / 60, seconds % 60)
    } else {
        format!("{} h {:02} min", seconds / 3600, (seconds % 3600) / 60)
    }
}

/// A whole page: header with navigation, what comes `before` the live region (refreshed by
/// `/console.js` from `live_src`, which answers JSON `{"html": ..., "refreshed_at": ...}`), the
/// live region, and what comes `after` it. Forms go before or after, never inside, so a refresh
/// does not wipe what an operator is typing.
pub struct Page<'a> {
    pub title: &'a str,
    pub coordinator: &'a str,
    pub before: &'a str,
    pub live_src: &'a str,
    pub live: &'a str,
    pub after: &'a str,
}

pub fn page(page: Page<'_>) -> String {
    let Page {
        title,
        coordinator,
        before,
        live_src,
        live,
        after,
    } = page;
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Treaty console</title>
<link rel="stylesheet" href="/console.css">
<script src="/console.js" defer></script>
</head>
<body>
<header>
<span class="brand">Treaty</span>
<nav><a href="/transactions">Transactions</a> <a href="/in-doubt">In doubt</a></nav>
<span class="coordinator">coordinator <code>{coordinator}</code></span>
<span id="refreshed" class="stale">not refreshed yet</span>
</header>
<main>
<h1>{title}</h1>
{before}
<div id="live" data-src="{live_src}">
{live}
</div>
{after}
</main>
</body>
</html>
"#,
        title = escape(title),
        coordinator = escape(coordinator),
        live_src = escape(live_src),
    )
}

/// A page that only says something (a refusal, an error, a recorded decision).
pub fn message_page(title: &str, coordinator: &str, class: &str, message: &str, links: &str) -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} · Treaty console</title>
<link rel="stylesheet" href="/console.css">
</head>
<body>
<header>
<span class="brand">Treaty</span>
<nav><a href="/transactions">Transactions</a> <a href="/in-doubt">In doubt</a></nav>
<span class="coordinator">coordinator <code>{coordinator}</code></span>
</header>
<main>
<h1>{title}</h1>
<p class="{class}" id="message">{message}</p>
<p>{links}</p>
</main>
</body>
</html>
"#,
        title = escape(title),
        coordinator = escape(coordinator),
        class = escape(class),
        message = escape(message),
    )
}

fn state_badge(state: &str) -> String {
    // The class is a slug of the name (`logging its commit decision` → `logging-its-commit-decision`).
    let class: String = state
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!(r#"<span class="state state-{class}">{}</span>"#, escape(state))
}

fn heuristic_note(heuristic: &HeuristicView) -> String {
    format!(
        r#"<span class="heuristic">heuristic {} by {} at {}: {}</span>"#,
        heuristic.decision,
        escape(&heuristic.operator),
        escape(&timestamp(heuristic.decided_at_ms)),
        escape(&heuristic.reason)
    )
}

/// The transactions page's filter form (outside the live region, so typing survives refreshes).
pub fn filter_form(filters: &Filters) -> String {
    let mut options = String::new();
    for filter in StateFilter::ALL {
        let selected = if filter == filters.state { " selected" } else { "" };
        let _ = write!(
            options,
            r#"<option value="{0}"{selected}>{0}</option>"#,
            filter.name()
        );
    }
    format!(
        r#"<form class="filters" method="get" action="/transactions">
<label>state <select name="state">{options}</select></label>
<label>label contains <input name="label" value="{label}"></label>
<label>shard <input name="shard" value="{shard}" size="8"></label>
<label>limit <input name="limit" value="{limit}" size="5"></label>
<button type="submit">Filter</button>
</form>
<form class="filters" method="get" action="/transactions/find">
<label>transaction <input name="txid" size="10" placeholder="txid"></label>
<button type="submit">Open</button>
</form>"#,
        label = escape(&filters.label),
        shard = escape(&filters.shard),
        limit = filters.limit,
    )
}

fn count_link(filters: &Filters, state: StateFilter, text: &str, count: usize) -> String {
    format!(
        r#"<a class="count" href="/transactions?state={}&amp;label={}&amp;shard={}">{} <b>{}</b></a>"#,
        state.name(),
        encode(&filters.label),
        encode(&filters.shard),
        escape(text),
        count
    )
}

fn branches_cell(transaction: &TransactionView) -> String {
    let mut cell = String::new();
    for branch in &transaction.branches {
        let _ = write!(
            cell,
            r#"<span class="branch">{} {}</span> "#,
            escape(&branch.shard),
            state_badge(&branch.state)
        );
    }
    cell
}

pub fn transactions_live(list: &TransactionList) -> String {
    let filters = &list.filters;
    let mut html = format!(
        r#"<p class="counts">{} {} {} {}</p>"#,
        count_link(
            filters,
            StateFilter::All,
            "all",
            list.counts.active + list.counts.in_doubt + list.counts.finished
        ),
        count_link(filters, StateFilter::Active, "active", list.counts.active),
        count_link(
            filters,
            StateFilter::InDoubt,
            "in doubt (phase two)",
            list.counts.in_doubt
        ),
        count_link(
            filters,
            StateFilter::Finished,
            "recent, finished",
            list.counts.finished
        ),
    );
    if list.transactions.is_empty() {
        html.push_str(r#"<p class="empty">No transaction matches.</p>"#);
        return html;
    }
    html.push_str(
        "<table class=\"transactions\"><thead><tr><th>txid</th><th>state</th><th>protocol</th>\
         <th>label</th><th>begun</th><th>age</th><th>branches</th><th>outcome</th></tr></thead><tbody>",
    );
    for txn in &list.transactions {
        let age = if txn.begun_at_ms == 0 {
            "(recovered)".to_owned()
        } else if txn.finished_at_ms > 0 {
            format!(
                "took {}",
                duration(txn.finished_at_ms.saturating_sub(txn.begun_at_ms))
            )
        } else {
            duration(list.now_ms.saturating_sub(txn.begun_at_ms))
        };
        let mut outcome = escape(&txn.outcome);
        if let Some(heuristic) = &txn.heuristic {
            outcome.push(' ');
            outcome.push_str(&heuristic_note(heuristic));
        }
        let _ = write!(
            html,
            r#"<tr data-txid="{txid}" data-gid="{gid}"><td><a href="/transactions/{txid}">{txid}</a></td><td>{state}</td><td class="nowrap">{protocol}</td><td>{label}</td><td class="nowrap">{begun}</td><td class="age">{age}</td><td>{branches}</td><td>{outcome}</td></tr>"#,
            txid = txn.txid,
            gid = escape(&txn.gid),
            state = state_badge(&txn.state),
            protocol = escape(&txn.protocol),
            label = escape(&txn.label),
            begun = if txn.begun_at_ms == 0 {
                String::new()
            } else {
                escape(&timestamp(txn.begun_at_ms))
            },
            age = escape(&age),
            branches = branches_cell(txn),
        );
    }
    html.push_str("</tbody></table>");
    html
}

pub fn detail_live(detail: &TransactionDetail) -> String {
    let txn = &detail.transaction;
    let when = |ms: u64| {
        if ms == 0 {
            "—".to_owned()
        } else {
            escape(&timestamp(ms))
        }
    };
    let mut html = format!(
        r#"<dl class="facts" data-txid="{txid}">
<dt>GID</dt><dd><code>{gid}</code></dd>
<dt>state</dt><dd>{state}</dd>
<dt>protocol</dt><dd>{protocol}</dd>
<dt>label</dt><dd>{label}</dd>
<dt>begun</dt><dd>{begun}</dd>
<dt>decided</dt><dd>{decided}</dd>
<dt>finished</dt><dd>{finished}</dd>
<dt>outcome</dt><dd>{outcome}</dd>
</dl>"#,
        txid = txn.txid,
        gid = escape(&txn.gid),
        state = state_badge(&txn.state),
        protocol = escape(&txn.protocol),
        label = escape(&txn.label),
        begun = if txn.recovered && txn.begun_at_ms == 0 {
            "recovered from the decision store after a restart".to_owned()
        } else {
            when(txn.begun_at_ms)
        },
        decided = when(txn.decided_at_ms),
        finished = when(txn.finished_at_ms),
        outcome = if txn.outcome.is_empty() {
            "not decided yet".to_owned()
        } else {
            escape(&txn.outcome)
        },
    );
    if let Some(heuristic) = &txn.heuristic {
        let _ = write!(
            html,
            r#"<p class="note">Heuristic decision: {} by {} at {}. Reason: {}</p>"#,
            heuristic.decision,
            escape(&heuristic.operator),
            escape(&timestamp(heuristic.decided_at_ms)),
            escape(&heuristic.reason)
        );
    }
    html.push_str(
        "<h2>Branches</h2><table class=\"branches\"><thead><tr><th>shard</th><th>state</th>\
         <th>phase-two sends</th><th>last error</th></tr></thead><tbody>",
    );
    for branch in &txn.branches {
        let _ = write!(
            html,
            r#"<tr data-shard="{0}"><td>{0}</td><td>{1}</td><td>{2}</td><td>{3}</td></tr>"#,
            escape(&branch.shard),
            state_badge(&branch.state),
            branch.attempts,
            escape(&branch.last_error)
        );
    }
    html.push_str("</tbody></table>");
    html.push_str(
        "<h2>Timeline</h2><table class=\"timeline\"><thead><tr><th>time</th><th>since begin</th>\
         <th>who</th><th>entered</th></tr></thead><tbody>",
    );
    // The timeline's marks plus the operator's note, in time order.
    let mut rows: Vec<(u64, String)> = detail
        .timeline
        .iter()
        .map(|mark| {
            let who = if mark.shard.is_empty() {
                "transaction".to_owned()
            } else {
                format!("shard {}", escape(&mark.shard))
            };
            (
                mark.at_ms,
                format!("<td>{who}</td><td>{}</td>", state_badge(&mark.phase)),
            )
        })
        .collect();
    if let Some(heuristic) = &txn.heuristic {
        rows.push((
            heuristic.decided_at_ms,
            format!("<td>operator</td><td>{}</td>", heuristic_note(heuristic)),
        ));
    }
    rows.sort_by_key(|(at_ms, _)| *at_ms);
    for (at_ms, cells) in rows {
        let since = if txn.begun_at_ms == 0 || at_ms < txn.begun_at_ms {
            String::new()
        } else {
            format!("+{}", duration(at_ms - txn.begun_at_ms))
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td>{cells}</tr>",
            escape(&timestamp(at_ms)),
            escape(&since)
        );
    }
    html.push_str("</tbody></table>");
    if detail.timeline_dropped > 0 {
        let _ = write!(
            html,
            r#"<p class="note">{} earlier marks were dropped to keep the record bounded.</p>"#,
            detail.timeline_dropped
        );
    }
    html
}

fn locks_cell(branch: &InDoubtView) -> String {
    if branch.locks.is_empty() {
        return "none".into();
    }
    let mut cell = String::from("<ul class=\"locks\">");
    for lock in &branch.locks {
        let _ = write!(
            cell,
            "<li>{} on {} {}{}</li>",
            escape(&lock.mode),
            escape(&lock.locktype),
            escape(&lock.relation),
            if lock.granted { "" } else { " (waiting)" }
        );
    }
    cell.push_str("</ul>");
    cell
}

pub fn in_doubt_live(list: &InDoubtList) -> String {
    let mut html = String::new();
    for unreachable in &list.unreachable {
        let _ = write!(
            html,
            r#"<p class="error">Shard {} did not answer: {}</p>"#,
            escape(&unreachable.shard),
            escape(&unreachable.error)
        );
    }
    if list.branches.is_empty() {
        html.push_str(r#"<p class="empty">No prepared branch on any shard that answered.</p>"#);
        return html;
    }
    html.push_str(
        "<table class=\"in-doubt\"><thead><tr><th>txid</th><th>shard</th><th>GID</th><th>age</th>\
         <th>prepared at</th><th>coordinator holds</th><th>locks</th><th></th></tr></thead><tbody>",
    );
    for branch in &list.branches {
        let mut holds = escape(&branch.coordinator_decision);
        if let Some(heuristic) = &branch.heuristic {
            holds.push(' ');
            holds.push_str(&heuristic_note(heuristic));
        }
        let _ = write!(
            html,
            r#"<tr data-gid="{gid}" data-shard="{shard}" data-age-ms="{age_ms}"><td><a href="/transactions/{txid}">{txid}</a></td><td>{shard}</td><td><code>{gid}</code></td><td class="age">{age}</td><td>{prepared}</td><td>{holds}</td><td>{locks}</td><td><a href="/in-doubt?txid={txid}#resolve">resolve…</a></td></tr>"#,
            txid = branch.txid,
            shard = escape(&branch.shard),
            gid = escape(&branch.gid),
            age_ms = branch.age_ms,
            age = escape(&duration(branch.age_ms)),
            prepared = escape(&timestamp(branch.prepared_at_ms)),
            locks = locks_cell(branch),
        );
    }
    html.push_str("</tbody></table>");
    html
}

/// The resolve form (outside the live region). POST only, and the reason is required here and
/// again by the server, which is the check that counts.
pub fn resolve_form(txid: Option<u64>) -> String {
    format!(
        r#"<section id="resolve">
<h2>Resolve by hand</h2>
<p>Forces a heuristic decision for a transaction whose coordinator cannot finish it. The
coordinator's rules refuse a decision that contradicts one it holds. The decision, operator, time
and reason are recorded with the transaction.</p>
<form method="post" action="/resolve">
<label>transaction <input name="txid" value="{txid}" required size="10"></label>
<label>decision <select name="decision"><option value="abort">abort</option><option value="commit">commit</option></select></label>
<label>operator <input name="operator" required size="12"></label>
<label>reason <input name="reason" required size="40" placeholder="why, e.g. a ticket"></label>
<button type="submit">Resolve</button>
</form>
</section>"#,
        txid = txid.map(|t| t.to_string()).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_escaped() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        let page = message_page("t<", "c\"", "error", "<b>", "");
        assert!(!page.contains("<b>"));
        assert!(page.contains("&lt;b&gt;"));
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_345), "12.3 s");
        assert_eq!(duration(245_000), "4 min 05 s");
        assert_eq!(duration(3_600_000 * 3 + 120_000), "3 h 02 min");
    }

    #[test]
    fn timestamps_are_utc() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00.000 UTC");
    }
}
