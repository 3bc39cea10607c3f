// Switchyard's web UI: live updates, live logs and the login (SCRAM, or the
// password inside TLS where the master's [[checker]]s need it).
// Pages work without it; this adds what needs a script. No dependencies
// (noble-hashes is loaded only where the browser lacks WebCrypto).
"use strict";

(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
  const csrf = () => { const m = $('meta[name="csrf-token"]'); return m ? m.content : ""; };

  // Times in the reader's own zone.
  function localTimes(root) {
    for (const t of $$("time[datetime]", root)) {
      const d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d)) { t.title = t.textContent; t.textContent = d.toLocaleString(); }
    }
  }

  // A form acts once: its buttons are disabled once it is sent (the
  // master also refuses a second submission of the same form).
  function guardForms(root) {
    for (const f of $$("form[method=post]", root)) {
      if (f.id === "login") continue;
      f.addEventListener("submit", () => {
        setTimeout(() => { for (const b of $$("button", f)) b.disabled = true; }, 0);
      });
    }
  }

  // ---------------------------------------------------------- live views
  // Parts of a page marked data-live are re-read when the master says
  // something changed; only the innermost are replaced, so a log being
  // read or a form being filled in stays as it is.
  let refreshing = false, again = false, lastRefresh = 0;
  async function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    try {
      const wait = Math.max(0, lastRefresh + 1000 - Date.now());
      if (wait) await new Promise(r => setTimeout(r, wait));
      lastRefresh = Date.now();
      const r = await fetch(location.href, { credentials: "same-origin" });
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      for (const el of $$("[data-live]")) {
        if ($("[data-live]", el)) continue;
        const fresh = $(`[data-live="${el.dataset.live}"]`, doc);
        if (fresh) { el.replaceWith(fresh); localTimes(fresh); guardForms(fresh); }
      }
    } catch (e) { /* the next event tries again */ } finally {
      refreshing = false;
      if (again) { again = false; refresh(); }
    }
  }

  function watchEvents() {
    if (!$("[data-live]")) return;
    const build = $("#logs") ? $("#logs").dataset.build : null;
    const es = new EventSource("/api/v1/events" + (build ? "?build=" + build : ""));
    for (const kind of ["build_started", "step_started", "step_ended", "build_ended",
                        "worker_connected", "worker_lost", "reloaded", "lagged"]) {
      es.addEventListener(kind, refresh);
    }
  }

  // ------------------------------------------------------------ live logs
  function atBottom(pre) { return pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8; }

  function logFor(step, attempt) {
    const key = step + "#" + attempt;
    let pre = $$("#logs pre").find(p => p.dataset.stepKey === key);
    if (!pre) {
      const sec = document.createElement("section");
      sec.className = "log";
      const h = document.createElement("h3");
      h.textContent = step + (attempt > 1 ? " (attempt " + attempt + ")" : "");
      pre = document.createElement("pre");
      pre.dataset.stepKey = key;
      sec.append(h, pre);
      $("#logs").append(sec);
    }
    return pre;
  }

  function liveLog() {
    const logs = $("#logs");
    if (!logs || logs.dataset.running !== "true") return;
    const url = `/api/v1/builds/${logs.dataset.build}/log/stream?format=html&start=${logs.dataset.liveStart}`;
    const es = new EventSource(url);
    es.addEventListener("output", ev => {
      const o = JSON.parse(ev.data);
      const pre = logFor(o.step, o.attempt);
      const follow = atBottom(pre);
      pre.insertAdjacentHTML("beforeend", o.html);
      if (follow) pre.scrollTop = pre.scrollHeight;
    });
    es.addEventListener("end", () => { es.close(); logs.dataset.running = "false"; refresh(); });
  }

  // A log opens at its tail; earlier output is read by range on demand.
  async function loadEarlier(button) {
    if (button.disabled) return;
    button.disabled = true;
    const pre = button.nextElementSibling;
    const end = Number(button.dataset.start), start = Math.max(0, end - 65536);
    const build = $("#logs").dataset.build;
    const r = await fetch(`/builds/${build}/log/html?step=${button.dataset.step}&attempt=${button.dataset.attempt}&start=${start}&end=${end}`,
                          { credentials: "same-origin" });
    if (r.ok) {
      const before = pre.scrollHeight;
      pre.insertAdjacentHTML("afterbegin", await r.text());
      pre.scrollTop += pre.scrollHeight - before;
      button.dataset.start = start;
      if (start === 0) button.remove();
    }
    button.disabled = false;
  }

  function earlierOnScroll() {
    for (const b of $$("button.earlier")) {
      b.addEventListener("click", () => loadEarlier(b));
      const pre = b.nextElementSibling;
      pre.addEventListener("scroll", () => { if (pre.scrollTop === 0 && b.isConnected) loadEarlier(b); });
    }
    // Open each log at its end.
    for (const pre of $$("#logs pre")) pre.scrollTop = pre.scrollHeight;
  }

  // ---------------------------------------------------------------- login
  const enc = new TextEncoder();
  const b64 = bytes => btoa(String.fromCharCode(...bytes));
  const unb64 = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));

  // SHA-256, HMAC-SHA-256 and PBKDF2: WebCrypto where the browser offers
  // it (secure contexts), else the vendored noble-hashes.
  async function cryptoFns() {
    if (window.crypto && crypto.subtle) {
      const s = crypto.subtle;
      const hmacKey = k => s.importKey("raw", k, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
      return {
        sha256: async d => new Uint8Array(await s.digest("SHA-256", d)),
        hmac: async (k, d) => new Uint8Array(await s.sign("HMAC", await hmacKey(k), d)),
        pbkdf2: async (pw, salt, c) => {
          const key = await s.importKey("raw", pw, "PBKDF2", false, ["deriveBits"]);
          return new Uint8Array(await s.deriveBits({ name: "PBKDF2", hash: "SHA-256", salt, iterations: c }, key, 256));
        },
      };
    }
    if (!window.nobleHashes) {
      await new Promise((ok, fail) => {
        const sc = document.createElement("script");
        sc.src = $("script[data-noble]").dataset.noble;
        sc.onload = ok; sc.onerror = fail;
        document.head.append(sc);
      });
    }
    const n = window.nobleHashes;
    return {
      sha256: async d => n.sha256(d),
      hmac: async (k, d) => n.hmac(n.sha256, k, d),
      pbkdf2: async (pw, salt, c) => n.pbkdf2(n.sha256, pw, salt, { c, dkLen: 32 }),
    };
  }

  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    });
    const j = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(j.error || ("HTTP " + r.status));
    return j;
  }

  // RFC 5802, without channel binding (the page cannot see the channel).
  async function scramLogin(user, password) {
    const c = await cryptoFns();
    const nonce = b64(crypto.getRandomValues(new Uint8Array(18)));
    const saslName = user.replace(/=/g, "=3D").replace(/,/g, "=2C");
    const bare = `n=${saslName},r=${nonce}`;
    const start = await post("/api/v1/login/start", { client_first: "n,," + bare });
    const sf = start.server_first;
    const attrs = Object.fromEntries(sf.split(",").map(a => [a[0], a.slice(2)]));
    if (!attrs.r || !attrs.r.startsWith(nonce) || !attrs.s || !(Number(attrs.i) > 0)) {
      throw new Error("the master's challenge is not valid SCRAM");
    }
    const salted = await c.pbkdf2(enc.encode(password), unb64(attrs.s), Number(attrs.i));
    const clientKey = await c.hmac(salted, enc.encode("Client Key"));
    const storedKey = await c.sha256(clientKey);
    const withoutProof = `c=biws,r=${attrs.r}`;
    const authMessage = enc.encode(`${bare},${sf},${withoutProof}`);
    const signature = await c.hmac(storedKey, authMessage);
    const proof = clientKey.map((b, i) => b ^ signature[i]);
    const serverKey = await c.hmac(salted, enc.encode("Server Key"));
    const expected = "v=" + b64(await c.hmac(serverKey, authMessage));
    const done = await post("/api/v1/login/finish", { login: start.login, client_final: `${withoutProof},p=${b64(proof)}` });
    if (done.server_final !== expected) {
      await fetch("/api/v1/logout", { method: "POST", credentials: "same-origin" });
      throw new Error("the master could not prove it knows your password: not logged in");
    }
    return done.user;
  }

  function loginForm() {
    const f = $("#login");
    if (!f) return;
    f.addEventListener("submit", async ev => {
      ev.preventDefault();
      const err = $("#login-error");
      const button = $("button", f);
      button.disabled = true;
      err.textContent = "";
      try {
        const [user, password] = [f.elements.user.value, f.elements.password.value];
        // Inside TLS, on a master whose [[checker]]s judge passwords, the
        // password itself goes (the server says so on the form).
        if ("password" in f.dataset) await post("/api/v1/login/password", { user, password });
        else await scramLogin(user, password);
        location.href = location.pathname === "/login" ? "/" : location.href;
      } catch (e) {
        err.textContent = "Login failed: " + e.message;
        button.disabled = false;
      }
    });
  }

  function logoutButton() {
    const b = $("#logout");
    if (!b) return;
    b.addEventListener("click", async () => {
      await fetch("/api/v1/logout", { method: "POST", credentials: "same-origin", headers: { "x-csrf-token": csrf() } });
      location.href = "/";
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    localTimes(document);
    guardForms(document);
    loginForm();
    logoutButton();
    earlierOnScroll();
    watchEvents();
    liveLog();
  });
})();
