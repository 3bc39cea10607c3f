//! What GitHub, GitLab and Gitea (Forgejo) deliveries mean as changes.
//!
//! - A push to a branch: one change per commit (author, message, time,
//!   files added, modified and removed), on the branch the ref names.
//! - A push of a tag: one change on the tagged commit, with property `tag`.
//! - A deleted branch or tag: nothing.
//! - A pull or merge request opened, updated with new commits, or reopened:
//!   one change on its head commit, with properties `pr_number`, `pr_base`
//!   and `pr_head_repository`; only schedulers with `pull_requests = true`
//!   build it.
//! - GitHub's and Gitea's `ping`: answered, nothing made. Anything else is
//!   acknowledged and ignored.
//!
//! Every change's `project` is the repository's full name (`owner/repo`;
//! GitLab's `path_with_namespace`).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::{PR_NUMBER, Provider, RepositoryUrl};
use crate::grpc::change_source::ChangeLimits;
use crate::store::NewChange;

/// What a delivery asks for.
#[derive(Debug)]
pub enum Event {
    /// The provider checks the hook works.
    Ping,
    /// Changes to store (possibly none: a deleted branch).
    Changes(Vec<NewChange>),
    /// An event this master does not act on, and why.
    Ignored(String),
}

/// A delivery whose JSON does not say what its event needs.
#[derive(Debug, thiserror::Error)]
#[error("the payload has no usable `{0}`")]
pub struct BadPayload(pub &'static str);

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut at = v;
    for p in path {
        at = at.get(p)?;
    }
    at.as_str()
}

fn list(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// An RFC 3339 time as (seconds, nanoseconds) since the epoch.
fn when(v: &Value) -> Option<(i64, i32)> {
    let t = chrono::DateTime::parse_from_rfc3339(v.get("timestamp")?.as_str()?).ok()?;
    Some((t.timestamp(), t.timestamp_subsec_nanos() as i32))
}

fn person(v: Option<&Value>) -> String {
    let Some(v) = v else { return String::new() };
    let name = v
        .get("name")
        .or_else(|| v.get("login"))
        .or_else(|| v.get("username"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    match v.get("email").and_then(Value::as_str) {
        Some(email) if !email.is_empty() => format!("{name} <{email}>"),
        _ => name.to_string(),
    }
}

/// The repository URL of the kind configured, from GitHub's or Gitea's
/// `repository` object.
fn github_url(repo: &Value, kind: RepositoryUrl) -> Option<String> {
    let key = match kind {
        RepositoryUrl::Clone => "clone_url",
        RepositoryUrl::Ssh => "ssh_url",
        RepositoryUrl::Web => "html_url",
    };
    repo.get(key)?.as_str().map(String::from)
}

/// The same from GitLab's `project` (or a merge request's `source` and
/// `target`).
fn gitlab_url(project: &Value, kind: RepositoryUrl) -> Option<String> {
    let key = match kind {
        RepositoryUrl::Clone => "git_http_url",
        RepositoryUrl::Ssh => "git_ssh_url",
        RepositoryUrl::Web => "web_url",
    };
    project.get(key)?.as_str().map(String::from)
}

/// A change for one commit object of a push (GitHub's, Gitea's and
/// GitLab's share these keys).
fn commit_change(repository: &str, branch: &str, c: &Value, category: &str) -> NewChange {
    let mut files = list(c, "added");
    files.extend(list(c, "modified"));
    files.extend(list(c, "removed"));
    NewChange {
        repository: repository.to_string(),
        branch: branch.to_string(),
        revision: str_at(c, &["id"]).unwrap_or_default().to_string(),
        author: person(c.get("author")),
        comments: str_at(c, &["message"]).unwrap_or_default().to_string(),
        category: category.to_string(),
        project: String::new(),
        files,
        when: when(c),
        properties: BTreeMap::new(),
    }
}

/// One change on a ref's new commit `after`: from the head commit object
/// when the payload has it, else only the pusher is known.
fn head_change(
    repository: String,
    branch: &str,
    after: &str,
    head: Option<&Value>,
    pusher: Option<&Value>,
    category: &str,
) -> NewChange {
    let mut c = match head {
        Some(h) => commit_change(&repository, branch, h, category),
        None => NewChange {
            repository,
            branch: branch.to_string(),
            author: person(pusher),
            category: category.into(),
            ..Default::default()
        },
    };
    c.revision = after.to_string();
    c
}

/// A push (branch or tag) as changes; `commits` and `head` are the
/// payload's commit objects, `after` the ref's new commit.
fn push_changes(
    repository: String,
    git_ref: &str,
    after: &str,
    commits: &[Value],
    head: Option<&Value>,
    pusher: Option<&Value>,
) -> Event {
    if after.is_empty() || after == ZERO_SHA {
        return Event::Changes(Vec::new());
    }
    if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
        let mut c = head_change(repository, tag, after, head, pusher, "tag");
        c.properties.insert("tag".into(), tag.to_string());
        return Event::Changes(vec![c]);
    }
    let Some(branch) = git_ref.strip_prefix("refs/heads/") else {
        return Event::Ignored(format!("a push to {git_ref:?}, neither a branch nor a tag"));
    };
    let mut changes: Vec<NewChange> = commits
        .iter()
        .map(|c| commit_change(&repository, branch, c, "push"))
        .filter(|c| !c.revision.is_empty())
        .collect();
    if changes.is_empty() {
        // A new branch at a commit pushed before: build its head.
        changes.push(head_change(repository, branch, after, head, pusher, "push"));
    }
    Event::Changes(changes)
}

/// A pull or merge request's change.
#[allow(clippy::too_many_arguments)]
fn pr_change(
    repository: String,
    head_repository: String,
    number: i64,
    base: &str,
    head_ref: &str,
    sha: &str,
    author: String,
    comments: String,
) -> Event {
    let mut properties = BTreeMap::new();
    properties.insert(PR_NUMBER.to_string(), number.to_string());
    properties.insert("pr_base".to_string(), base.to_string());
    properties.insert("pr_head_repository".to_string(), head_repository);
    Event::Changes(vec![NewChange {
        repository,
        branch: head_ref.to_string(),
        revision: sha.to_string(),
        author,
        comments,
        category: "pull_request".into(),
        project: String::new(),
        files: Vec::new(),
        when: None,
        properties,
    }])
}

/// Fits a webhook's change within the limits every change has
/// ([`ChangeLimits`], as for gRPC): a long commit message is cut at the
/// limit with a marker, files past the limit or longer than a path may be
/// are left out (a commit touching 50,000 files still builds); a
/// repository, branch, revision or author over its limit refuses the
/// delivery, naming the field.
pub fn fit(mut c: NewChange, limits: &ChangeLimits) -> Result<NewChange, String> {
    for (field, value) in [
        ("repository", &c.repository),
        ("branch", &c.branch),
        ("revision", &c.revision),
        ("author", &c.author),
    ] {
        if value.len() > limits.max_field {
            return Err(format!(
                "a change's {field} is {} bytes, over the limit of {}",
                value.len(),
                limits.max_field
            ));
        }
    }
    if c.comments.len() > limits.max_comments {
        const MARK: &str = "\n[… cut at the limit]";
        let mut end = limits.max_comments - MARK.len();
        while !c.comments.is_char_boundary(end) {
            end -= 1;
        }
        c.comments.truncate(end);
        c.comments.push_str(MARK);
    }
    c.files.retain(|f| f.len() <= limits.max_path);
    c.files.truncate(limits.max_files);
    Ok(c)
}

/// What a delivery of `event` (the provider's event header) with `payload`
/// asks for.
pub fn parse(
    provider: Provider,
    event: &str,
    payload: &Value,
    url: RepositoryUrl,
) -> Result<Event, BadPayload> {
    let mut parsed = match provider {
        Provider::GitHub | Provider::Gitea => github_like(provider, event, payload, url)?,
        Provider::GitLab => gitlab(event, payload, url)?,
    };
    // The project is the repository's full name (`owner/repo`, GitLab's
    // `group/project`), for schedulers and steps (`%(prop:project)s`).
    let project = str_at(payload, &["repository", "full_name"])
        .or_else(|| str_at(payload, &["project", "path_with_namespace"]))
        .unwrap_or_default();
    if let Event::Changes(changes) = &mut parsed {
        for c in changes {
            c.project = project.to_string();
        }
    }
    Ok(parsed)
}

fn github_like(
    provider: Provider,
    event: &str,
    p: &Value,
    url: RepositoryUrl,
) -> Result<Event, BadPayload> {
    match event {
        "ping" => Ok(Event::Ping),
        "push" => {
            let repository = p
                .get("repository")
                .and_then(|r| github_url(r, url))
                .ok_or(BadPayload("repository"))?;
            let git_ref = str_at(p, &["ref"]).ok_or(BadPayload("ref"))?;
            if p.get("deleted").and_then(Value::as_bool) == Some(true) {
                return Ok(Event::Changes(Vec::new()));
            }
            let after = str_at(p, &["after"]).ok_or(BadPayload("after"))?;
            let commits = p
                .get("commits")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            Ok(push_changes(
                repository,
                git_ref,
                after,
                commits,
                p.get("head_commit").filter(|h| !h.is_null()),
                p.get("pusher"),
            ))
        }
        "pull_request" => {
            let action = str_at(p, &["action"]).unwrap_or_default();
            // GitHub says `synchronize`, Gitea `synchronized`.
            if !matches!(
                action,
                "opened" | "reopened" | "synchronize" | "synchronized"
            ) {
                return Ok(Event::Ignored(format!("pull request {action}")));
            }
            let pr = p.get("pull_request").ok_or(BadPayload("pull_request"))?;
            let number = p
                .get("number")
                .or_else(|| pr.get("number"))
                .and_then(Value::as_i64)
                .ok_or(BadPayload("number"))?;
            let head = pr.get("head").ok_or(BadPayload("pull_request.head"))?;
            let base = pr.get("base").ok_or(BadPayload("pull_request.base"))?;
            let repository = base
                .get("repo")
                .and_then(|r| github_url(r, url))
                .or_else(|| p.get("repository").and_then(|r| github_url(r, url)))
                .ok_or(BadPayload("pull_request.base.repo"))?;
            let head_repository = head
                .get("repo")
                .and_then(|r| github_url(r, url))
                .unwrap_or_else(|| repository.clone());
            let title = str_at(pr, &["title"]).unwrap_or_default();
            let body = str_at(pr, &["body"]).unwrap_or_default();
            Ok(pr_change(
                repository,
                head_repository,
                number,
                str_at(base, &["ref"]).ok_or(BadPayload("pull_request.base.ref"))?,
                str_at(head, &["ref"]).ok_or(BadPayload("pull_request.head.ref"))?,
                str_at(head, &["sha"]).ok_or(BadPayload("pull_request.head.sha"))?,
                person(pr.get("user")),
                if body.is_empty() {
                    title.to_string()
                } else {
                    format!("{title}\n\n{body}")
                },
            ))
        }
        other => Ok(Event::Ignored(format!(
            "{} event {other:?}",
            provider.name()
        ))),
    }
}

fn gitlab(event: &str, p: &Value, url: RepositoryUrl) -> Result<Event, BadPayload> {
    match event {
        "Push Hook" | "Tag Push Hook" => {
            let project = p.get("project").or_else(|| p.get("repository"));
            let repository = project
                .and_then(|r| gitlab_url(r, url))
                .ok_or(BadPayload("project"))?;
            let git_ref = str_at(p, &["ref"]).ok_or(BadPayload("ref"))?;
            let after = str_at(p, &["after"]).ok_or(BadPayload("after"))?;
            let commits = p
                .get("commits")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            // GitLab has no head_commit: the one whose id is checkout_sha.
            let head_sha = str_at(p, &["checkout_sha"]).unwrap_or(after);
            let head = commits
                .iter()
                .find(|c| str_at(c, &["id"]) == Some(head_sha));
            let pusher = serde_json::json!({
                "name": str_at(p, &["user_name"]).unwrap_or_default(),
                "email": str_at(p, &["user_email"]).unwrap_or_default(),
            });
            let tagged = if git_ref.starts_with("refs/tags/") {
                head_sha
            } else {
                after
            };
            Ok(push_changes(
                repository,
                git_ref,
                tagged,
                commits,
                head,
                Some(&pusher),
            ))
        }
        "Merge Request Hook" => {
            let a = p
                .get("object_attributes")
                .ok_or(BadPayload("object_attributes"))?;
            let action = str_at(a, &["action"]).unwrap_or_default();
            // An update without `oldrev` changed the title or labels, not
            // the code.
            let new_commits = action == "update" && a.get("oldrev").is_some_and(|o| !o.is_null());
            if !(matches!(action, "open" | "reopen") || new_commits) {
                return Ok(Event::Ignored(format!("merge request {action}")));
            }
            let repository = a
                .get("target")
                .and_then(|t| gitlab_url(t, url))
                .or_else(|| p.get("project").and_then(|t| gitlab_url(t, url)))
                .ok_or(BadPayload("object_attributes.target"))?;
            let head_repository = a
                .get("source")
                .and_then(|t| gitlab_url(t, url))
                .unwrap_or_else(|| repository.clone());
            let last = a
                .get("last_commit")
                .ok_or(BadPayload("object_attributes.last_commit"))?;
            let title = str_at(a, &["title"]).unwrap_or_default();
            let description = str_at(a, &["description"]).unwrap_or_default();
            Ok(pr_change(
                repository,
                head_repository,
                a.get("iid")
                    .and_then(Value::as_i64)
                    .ok_or(BadPayload("object_attributes.iid"))?,
                str_at(a, &["target_branch"])
                    .ok_or(BadPayload("object_attributes.target_branch"))?,
                str_at(a, &["source_branch"])
                    .ok_or(BadPayload("object_attributes.source_branch"))?,
                str_at(last, &["id"]).ok_or(BadPayload("object_attributes.last_commit.id"))?,
                person(p.get("user")),
                if description.is_empty() {
                    title.to_string()
                } else {
                    format!("{title}\n\n{description}")
                },
            ))
        }
        other => Ok(Event::Ignored(format!("gitlab event {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_fitted_to_the_limits() {
        let limits = ChangeLimits::default();
        let c = NewChange {
            repository: "r".into(),
            comments: "é".repeat(40_000),
            files: (0..12_000)
                .map(|i| format!("f{i}"))
                .chain(["x".repeat(5000)])
                .collect(),
            ..Default::default()
        };
        let fitted = fit(c, &limits).unwrap();
        assert!(fitted.comments.len() <= limits.max_comments);
        assert!(fitted.comments.ends_with("cut at the limit]"));
        assert_eq!(fitted.files.len(), limits.max_files);
        let long = NewChange {
            branch: "b".repeat(2000),
            ..Default::default()
        };
        assert!(fit(long, &limits).unwrap_err().contains("branch"));
    }
}
