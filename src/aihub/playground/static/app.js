/*
 * aihub playground: one page that drives every product of this server.
 *
 * Plain ES2020, no framework, no module, no build step. Everything shown on the page is put there
 * with textContent / createElement: no HTML string is ever parsed, so nothing a model or a user
 * wrote can become markup.
 *
 * Layout of this file:
 *   1. DOM helpers            5. Markdown renderer
 *   2. Errors                 6. Sign-in state
 *   3. HTTP                   7. One section per product (providers, account, ideas,
 *   4. Stream readers            challenges, images, chats, bring-your-own-key, usage)
 *                             8. Start-up
 */
"use strict";

(() => {
  // ------------------------------------------------------------------------------------------
  // 1. DOM helpers
  // ------------------------------------------------------------------------------------------

  const $ = (id) => {
    const node = document.getElementById(id);
    if (!node) throw new Error(`The page has no #${id}`);
    return node;
  };

  /** `el("p", {className: "x", text: "hi", attrs: {"data-testid": "y"}}, child, ...)` */
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    if (props.className) node.className = props.className;
    if (props.id) node.id = props.id;
    if (props.text !== undefined && props.text !== null) node.textContent = String(props.text);
    for (const [name, value] of Object.entries(props.attrs || {})) {
      if (value !== undefined && value !== null && value !== false) {
        node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** Show a message in a status line; `kind` is "", "busy", "success" or "error". */
  function setStatus(node, message, kind = "") {
    node.textContent = message || "";
    node.dataset.kind = message ? kind : "";
  }

  /** Enable/disable a button; if it had the focus while being disabled, move it to `fallback`. */
  function setEnabled(button, enabled, fallback) {
    if (!enabled && document.activeElement === button && fallback && !fallback.disabled) {
      fallback.focus();
    }
    button.disabled = !enabled;
  }

  function onSubmit(form, handler) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      handler(event);
    });
  }

  /** Ctrl+Enter (or Cmd+Enter) in a textarea presses `button`. */
  function sendOnCtrlEnter(textarea, button) {
    textarea.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        if (!button.disabled) button.click();
      }
    });
  }

  function formatMs(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms)) return "—";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  }

  function formatDate(value) {
    if (!value) return "—";
    const date = new Date(value);
    if (Number.isNaN(date.getTime())) return String(value);
    return date.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
  }

  function formatNumber(value) {
    return typeof value === "number" ? value.toLocaleString() : "—";
  }

  /** A link target that is safe to put in href/src: http(s), or a path on this server. */
  function safeUrl(value, { allowData = false, allowBlob = false } = {}) {
    if (typeof value !== "string" || !value) return null;
    if (allowData && /^data:image\/(png|jpe?g|gif|webp);base64,/i.test(value)) return value;
    if (allowBlob && value.startsWith("blob:")) return value;
    try {
      const url = new URL(value, window.location.href);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (_) {
      return null;
    }
  }

  function scrollToEnd(node) {
    node.scrollTop = node.scrollHeight;
  }

  // ------------------------------------------------------------------------------------------
  // 2. Errors: every API error is JSON {error, detail}; turn it into a sentence for people
  // ------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, detail, retryAfter) {
      super(detail);
      this.name = "ApiError";
      this.status = status;
      this.code = code;
      this.detail = detail;
      this.retryAfter = retryAfter;
    }
  }

  class NotSignedIn extends Error {
    constructor() {
      super("Not signed in");
      this.name = "NotSignedIn";
    }
  }

  /** An error the server reported inside a stream that had already started. */
  class StreamError extends Error {
    constructor(message, code) {
      super(message || "The stream failed");
      this.name = "StreamError";
      this.code = code || "stream_error";
    }
  }

  async function errorFrom(response) {
    const retryAfter = response.headers.get("Retry-After");
    let code = `http_${response.status}`;
    let detail = response.statusText || `HTTP ${response.status}`;
    const text = await response.text().catch(() => "");
    const body = parseJSON(text);
    if (body && typeof body === "object") {
      if (typeof body.error === "string") code = body.error;
      if (typeof body.detail === "string") detail = body.detail;
      else if (Array.isArray(body.detail)) {
        detail = body.detail.map((d) => (d && d.msg) || String(d)).join("; ");
      } else if (typeof body.error === "string") detail = body.error;
    } else if (text && text.length < 300 && !/[<>]/.test(text)) {
      detail = text.trim() || detail;
    }
    return new ApiError(response.status, code, detail, retryAfter);
  }

  /** "at 14:05 (in 2 h 3 min)" from a Retry-After header (seconds or an HTTP date). */
  function describeRetryAfter(value) {
    if (!value) return "";
    let when;
    if (/^\d+$/.test(value.trim())) when = new Date(Date.now() + Number(value) * 1000);
    else when = new Date(value);
    if (Number.isNaN(when.getTime())) return "";
    const seconds = Math.max(0, Math.round((when.getTime() - Date.now()) / 1000));
    const minutes = Math.ceil(seconds / 60);
    let wait;
    if (seconds < 60) wait = `${seconds} s`;
    else if (minutes < 60) wait = `${minutes} min`;
    else wait = `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
    const clock = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    const tomorrow = new Date(Date.now() + 86400000).toDateString();
    let day = "";
    if (when.toDateString() === tomorrow) day = "tomorrow ";
    else if (when.toDateString() !== new Date().toDateString()) {
      day = `${when.toLocaleDateString([], { weekday: "long", day: "numeric", month: "short" })} `;
    }
    return `${day}at ${clock} (in ${wait})`;
  }

  function sentence(text) {
    const trimmed = String(text || "").trim();
    return /[.!?)]$/.test(trimmed) ? trimmed : `${trimmed}.`;
  }

  /**
   * A readable message for any failure. `context`: "login" (a 401 means a wrong password),
   * "byok" (a 401 comes from OpenAI, not from aihub).
   */
  function describeError(error, context = "") {
    if (!error) return "Something went wrong.";
    if (error.name === "AbortError") return "Stopped.";
    if (error instanceof NotSignedIn) return "Sign in first (in “Your account” above).";
    if (error instanceof StreamError) return `The reply stopped: ${sentence(error.message)}`;
    if (!(error instanceof ApiError)) {
      return "Cannot reach the aihub server. Is it still running? " +
        `(${error.message || "network error"})`;
    }
    const detail = sentence(error.detail);
    switch (error.status) {
      case 401:
        if (context === "login") return detail;
        if (context === "byok") return `${detail} Check the key and try again.`;
        return `${detail} Please sign in again (in “Your account” above).`;
      case 403:
        return `Not allowed: ${detail}`;
      case 404:
        return `Not found: ${detail}`;
      case 409:
        return context === "login" ? `${detail} Use “Sign in” instead.` : detail;
      case 413:
        return `Too large: ${detail}`;
      case 422:
        return `Please check what you typed: ${detail}`;
      case 429: {
        const when = describeRetryAfter(error.retryAfter);
        if (error.code === "quota_exceeded") {
          return `Quota exhausted: ${detail}` + (when ? ` You can try again ${when}.` : "");
        }
        return `Too many requests: ${detail}` + (when ? ` Try again ${when}.` : " Try again shortly.");
      }
      case 502:
        return `The provider failed: ${detail} Try again.`;
      case 503:
        if (context === "byok") {
          return `OpenAI could not be reached: ${detail} This needs network access to OpenAI ` +
            "(or OPENAI_BASE_URL set on the aihub server).";
        }
        return `The provider (or a service it needs) is down or unreachable: ${detail} ` +
          "Try again in a moment.";
      default:
        return error.status >= 500
          ? `The server failed (HTTP ${error.status}): ${detail}`
          : `Request refused (HTTP ${error.status}): ${detail}`;
    }
  }

  function parseJSON(text) {
    if (typeof text !== "string" || !text) return null;
    try {
      return JSON.parse(text);
    } catch (_) {
      return null;
    }
  }

  // ------------------------------------------------------------------------------------------
  // 3. HTTP
  // ------------------------------------------------------------------------------------------

  const auth = { token: null, user: null };
  const TOKEN_KEY = "aihub.playground.token";

  /**
   * fetch() with the bearer token (unless `authenticated: false`), a JSON body (`json`), and
   * errors thrown as ApiError. Resolves to the Response (its body unread) when it is 2xx.
   */
  async function request(path, options = {}) {
    const { method = "GET", json, accept, signal, authenticated = true } = options;
    const headers = new Headers();
    if (json !== undefined) headers.set("Content-Type", "application/json");
    if (accept) headers.set("Accept", accept);
    if (authenticated) {
      if (!auth.token) throw new NotSignedIn();
      headers.set("Authorization", `Bearer ${auth.token}`);
    }
    const response = await fetch(path, {
      method,
      headers,
      body: json === undefined ? undefined : JSON.stringify(json),
      signal,
      cache: "no-store",
      credentials: "same-origin",
    });
    if (!response.ok) {
      const error = await errorFrom(response);
      if (error.status === 401 && authenticated) signedOut("expired");
      throw error;
    }
    return response;
  }

  async function requestJSON(path, options) {
    const response = await request(path, options);
    if (response.status === 204) return null;
    return response.json();
  }

  // ------------------------------------------------------------------------------------------
  // 4. Stream readers: text chunks, Server-Sent Events, NDJSON
  // ------------------------------------------------------------------------------------------

  /** The response body as decoded text chunks, as they arrive. */
  async function* textChunks(response) {
    if (!response.body) {
      const text = await response.text();
      if (text) yield text;
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let finished = false;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const text = decoder.decode(value, { stream: true });
        if (text) yield text;
      }
      finished = true;
      const tail = decoder.decode();
      if (tail) yield tail;
    } finally {
      if (!finished) reader.cancel().catch(() => {});
    }
  }

  /** The event-stream format (https://html.spec.whatwg.org/#event-stream-interpretation). */
  class SSEParser {
    constructor() {
      this.buffer = "";
      this.eventName = "";
      this.data = [];
      this.lastId = null;
    }

    /** Feed text; returns the events it completed: {event, data, id}. */
    push(text) {
      this.buffer += text;
      const events = [];
      for (;;) {
        const end = this.buffer.search(/[\r\n]/);
        if (end === -1) break;
        // A lone "\r" at the end may be the first half of "\r\n": wait for more.
        if (this.buffer[end] === "\r" && end === this.buffer.length - 1) break;
        const line = this.buffer.slice(0, end);
        const width = this.buffer[end] === "\r" && this.buffer[end + 1] === "\n" ? 2 : 1;
        this.buffer = this.buffer.slice(end + width);
        const event = this.line(line);
        if (event) events.push(event);
      }
      return events;
    }

    line(line) {
      if (line === "") {
        const name = this.eventName;
        this.eventName = "";
        if (this.data.length === 0) return null;
        const data = this.data.join("\n");
        this.data = [];
        return { event: name || "message", data, id: this.lastId };
      }
      if (line.startsWith(":")) return null; // a comment (keep-alive)
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") this.eventName = value;
      else if (field === "data") this.data.push(value);
      else if (field === "id" && !value.includes("\0")) this.lastId = value;
      return null;
    }
  }

  /** Named events from a text/event-stream response, their data parsed as JSON when it is. */
  async function* sseEvents(response) {
    const parser = new SSEParser();
    for await (const chunk of textChunks(response)) {
      for (const event of parser.push(chunk)) {
        yield { event: event.event, id: event.id, raw: event.data, data: parseJSON(event.data) };
      }
    }
  }

  /** One parsed object per line of an application/x-ndjson response. */
  async function* ndjsonObjects(response) {
    let buffer = "";
    for await (const chunk of textChunks(response)) {
      buffer += chunk;
      let newline;
      while ((newline = buffer.indexOf("\n")) !== -1) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (line) {
          const object = parseJSON(line);
          if (object !== null) yield object;
        }
      }
    }
    const last = parseJSON(buffer.trim());
    if (last !== null) yield last;
  }

  // ------------------------------------------------------------------------------------------
  // 5. Markdown: headings, emphasis, lists, code, quotes, links, paragraphs — as DOM nodes
  // ------------------------------------------------------------------------------------------

  const Markdown = (() => {
    const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
    const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$/;
    const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
    const QUOTE = /^ {0,3}> ?(.*)$/;
    const ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$/;
    const INLINE = new RegExp(
      [
        /(`+)([\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code
        /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 3: strong
        /__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 4: strong
        /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 5: emphasis
        /\b_(?=[^\s_])([\s\S]*?[^\s_])_\b/.source, // 6: emphasis
        /\[([^\]\n]+)\]\(([^()\s]+)\)/.source, // 7, 8: link
      ].join("|"),
      "g"
    );

    /** `headingOffset` shifts levels so that the page's heading outline stays in order. */
    function render(source, container, { headingOffset = 2 } = {}) {
      const fragment = document.createDocumentFragment();
      const lines = String(source || "").replace(/\r\n?/g, "\n").replace(/\t/g, "    ").split("\n");
      blocks(lines, fragment, headingOffset);
      container.replaceChildren(fragment);
    }

    const isBlank = (line) => /^\s*$/.test(line);
    const indentOf = (line) => line.length - line.trimStart().length;
    const startsBlock = (line) =>
      FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line);

    function blocks(lines, parent, headingOffset) {
      let i = 0;
      while (i < lines.length) {
        const line = lines[i];
        let match;
        if (isBlank(line)) {
          i += 1;
        } else if ((match = FENCE.exec(line))) {
          i = codeBlock(lines, i, match, parent);
        } else if ((match = HEADING.exec(line))) {
          const level = Math.min(6, match[1].length + headingOffset);
          const heading = el(`h${level}`, { className: "md-heading" });
          inline(match[2] || "", heading);
          parent.append(heading);
          i += 1;
        } else if (RULE.test(line)) {
          parent.append(el("hr"));
          i += 1;
        } else if (QUOTE.test(line)) {
          const quoted = [];
          while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
            quoted.push(match[1]);
            i += 1;
          }
          const quote = el("blockquote");
          blocks(quoted, quote, headingOffset);
          parent.append(quote);
        } else if (ITEM.test(line)) {
          i = list(lines, i, parent, headingOffset);
        } else {
          const text = [line.trim()];
          i += 1;
          while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines[i])) {
            text.push(lines[i].trim());
            i += 1;
          }
          const paragraph = el("p");
          inline(text.join("\n"), paragraph);
          parent.append(paragraph);
        }
      }
    }

    function codeBlock(lines, start, match, parent) {
      const fence = match[1];
      const closing = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}\\s*$`);
      const body = [];
      let i = start + 1;
      while (i < lines.length && !closing.test(lines[i])) {
        body.push(lines[i]);
        i += 1;
      }
      const code = el("code", { text: body.join("\n") });
      if (match[2]) code.dataset.language = match[2];
      parent.append(el("pre", { attrs: { tabindex: "0" } }, code));
      return i + 1; // past the closing fence (or the end, while it streams)
    }

    function list(lines, start, parent, headingOffset) {
      const first = ITEM.exec(lines[start]);
      const indent = first[1].length;
      const ordered = /\d/.test(first[2]);
      const node = el(ordered ? "ol" : "ul");
      if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
      let i = start;
      while (i < lines.length) {
        const match = ITEM.exec(lines[i]);
        if (!match || match[1].length !== indent || /\d/.test(match[2]) !== ordered) break;
        const contentIndent = indent + match[2].length + 1;
        const content = [match[3] || ""];
        let loose = false;
        i += 1;
        while (i < lines.length) {
          const line = lines[i];
          if (isBlank(line)) {
            let next = i + 1;
            while (next < lines.length && isBlank(lines[next])) next += 1;
            if (next < lines.length && indentOf(lines[next]) >= contentIndent) {
              loose = true;
              content.push("");
              i += 1;
              continue;
            }
            break;
          }
          const nested = ITEM.exec(line);
          if (nested && nested[1].length <= indent) break; // a sibling, or an outer list's item
          if (indentOf(line) > indent) {
            content.push(line.slice(Math.min(indentOf(line), contentIndent)));
          } else if (startsBlock(line)) {
            break;
          } else {
            content.push(line.trim()); // lazy continuation of the item's paragraph
          }
          i += 1;
        }
        const item = el("li");
        blocks(content, item, headingOffset);
        if (!loose) {
          // A tight list: its items' paragraphs are shown inline.
          for (const paragraph of Array.from(item.children)) {
            if (paragraph.tagName === "P") paragraph.replaceWith(...paragraph.childNodes);
          }
        }
        node.append(item);
        // A blank line between two items of this list does not end it.
        let next = i;
        while (next < lines.length && isBlank(lines[next])) next += 1;
        const sibling = next < lines.length && ITEM.exec(lines[next]);
        if (next > i && sibling && sibling[1].length === indent &&
            /\d/.test(sibling[2]) === ordered) {
          i = next;
        }
      }
      parent.append(node);
      return i;
    }

    /** Inline Markdown of `text` appended to `parent` as text nodes and elements. */
    function inline(text, parent) {
      let last = 0;
      INLINE.lastIndex = 0;
      const matches = Array.from(text.matchAll(INLINE));
      for (const match of matches) {
        if (match.index < last) continue;
        if (match.index > last) parent.append(text.slice(last, match.index));
        last = match.index + match[0].length;
        if (match[2] !== undefined) {
          parent.append(el("code", { text: match[2].replace(/^ (.+) $/, "$1") }));
        } else if (match[3] !== undefined || match[4] !== undefined) {
          const strong = el("strong");
          inline(match[3] !== undefined ? match[3] : match[4], strong);
          parent.append(strong);
        } else if (match[5] !== undefined || match[6] !== undefined) {
          const em = el("em");
          inline(match[5] !== undefined ? match[5] : match[6], em);
          parent.append(em);
        } else if (match[7] !== undefined) {
          const href = safeUrl(match[8]);
          if (href) {
            const link = el("a", { attrs: { href, rel: "noopener noreferrer nofollow" } });
            inline(match[7], link);
            parent.append(link);
          } else {
            parent.append(match[0]);
          }
        }
      }
      if (last < text.length) parent.append(text.slice(last));
    }

    return { render, inline };
  })();

  /** Re-renders streamed Markdown at most once a frame; `flush()` renders now. */
  class MarkdownView {
    constructor(container, options = {}) {
      this.container = container;
      this.options = options;
      this.text = "";
      this.pending = false;
    }

    set(text) {
      this.text = text;
      if (this.pending) return;
      this.pending = true;
      const draw = () => {
        if (this.pending) this.flush();
      };
      if (document.visibilityState === "visible" && window.requestAnimationFrame) {
        window.requestAnimationFrame(draw);
      } else {
        setTimeout(draw, 50);
      }
    }

    flush() {
      this.pending = false;
      Markdown.render(this.text, this.container, this.options);
    }
  }

  /** A Markdown "#" in a chat message is an h4: it sits under the section's h2 and the chat's h3. */
  const MESSAGE_HEADINGS = { headingOffset: 3 };

  // ------------------------------------------------------------------------------------------
  // 6. Sign-in state
  // ------------------------------------------------------------------------------------------

  const whenSignedIn = []; // callbacks run after every sign-in
  const whenSignedOut = []; // and after every sign-out

  function setToken(token, remember) {
    auth.token = token;
    try {
      if (token && remember) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (_) {
      // Storage refused (private mode): the token stays in memory only.
    }
  }

  function showUser() {
    const whoami = $("whoami");
    const user = auth.user;
    if (!auth.token) {
      whoami.textContent = "Not signed in.";
      whoami.dataset.state = "signed-out";
    } else if (user) {
      const name = user.email || user.name || user.clerk_id || user.id;
      const plan = user.plan ? ` · plan: ${user.plan}` : "";
      whoami.textContent = `Signed in as ${name}${plan} (user id ${user.id}).`;
      whoami.dataset.state = "signed-in";
    } else {
      whoami.textContent = "Checking your token…";
      whoami.dataset.state = "checking";
    }
    $("signout-button").disabled = !auth.token;
  }

  /** Called with a new token: checks it with GET /api/me, then refreshes every section. */
  async function signedIn(token) {
    if (auth.token) {
      // Switching accounts: clear what the previous one showed.
      for (const callback of whenSignedOut) callback();
    }
    setToken(token, $("auth-remember").checked);
    auth.user = null;
    showUser();
    try {
      auth.user = await requestJSON("/api/me");
    } catch (error) {
      if (auth.token === token) {
        setToken(null, false); // refused or not checkable: forget it
        showUser();
      }
      setStatus($("auth-status"), describeError(error), "error");
      return false;
    }
    showUser();
    for (const callback of whenSignedIn) callback();
    return true;
  }

  /** `reason`: "user" (the sign-out button) or "expired" (a request answered 401). */
  function signedOut(reason) {
    if (!auth.token) return;
    setToken(null, false);
    auth.user = null;
    showUser();
    if (reason === "expired") {
      $("whoami").textContent =
        "Your sign-in is no longer valid (expired or refused): please sign in again.";
      $("whoami").dataset.state = "expired";
    }
    for (const callback of whenSignedOut) callback();
  }

  // ------------------------------------------------------------------------------------------
  // 7. Sections
  // ------------------------------------------------------------------------------------------

  // --- Providers -----------------------------------------------------------------------------

  const PRODUCTS = {
    ideas: "Business ideas",
    challenges: "Coding challenges",
    images: "Image jobs",
    chats: "Chats with files",
    byok: "Bring your own key",
  };

  function describeProvider(product, info) {
    if (!info) return "not reported by this server";
    if (product === "byok") {
      const models = Array.isArray(info.models) ? info.models.join(", ") : info.model;
      const provider = !info.provider || info.provider === "openai" ? "OpenAI" : info.provider;
      return `relayed to ${provider} with the API key you type (models: ${models})`;
    }
    if (info.offline) {
      const configured = info.configured && info.configured !== info.chain
        ? `; with a key it would use ${info.configured}`
        : "";
      return `runs on the offline provider (no key configured)${configured}`;
    }
    return `runs on ${info.provider}, model ${info.model}`;
  }

  async function loadProviders() {
    const status = $("providers-status");
    setStatus(status, "Asking the server…", "busy");
    let health;
    try {
      health = await requestJSON("/api/health", { authenticated: false });
    } catch (error) {
      $("providers").replaceChildren(el("li", { text: "Could not read /api/health." }));
      setStatus(status, describeError(error), "error");
      return;
    }
    const products = (health && health.products) || {};
    const items = Object.entries(PRODUCTS).map(([product, label]) =>
      el(
        "li",
        { attrs: { "data-testid": `provider-${product}`, "data-offline": String(!!(products[product] || {}).offline) } },
        el("strong", { text: `${label}: ` }),
        describeProvider(product, products[product])
      )
    );
    $("providers").replaceChildren(...items);
    for (const product of Object.keys(PRODUCTS)) {
      const note = document.getElementById(`${product}-provider`);
      if (note) {
        note.textContent = `${PRODUCTS[product]}: ${describeProvider(product, products[product])}.`;
        note.dataset.offline = String(!!(products[product] || {}).offline);
      }
    }
    const byok = products.byok;
    if (byok && Array.isArray(byok.models) && byok.models.length) fillModels(byok.models);
    setStatus(status, `Server version ${health.version || "?"}: ${health.status || "ok"}.`, "success");
  }

  // --- Account -------------------------------------------------------------------------------

  function setUpAccount() {
    const status = $("auth-status");

    onSubmit($("auth-form"), async (event) => {
      const action = event.submitter && event.submitter.id === "signin-button" ? "signin" : "signup";
      const email = $("signup-email").value.trim();
      const password = $("signup-password").value;
      if (!email || !password) {
        setStatus(status, "Type an email address and a password first.", "error");
        return;
      }
      const path = action === "signup" ? "/api/auth/register" : "/api/auth/login";
      setStatus(status, action === "signup" ? "Creating your account…" : "Signing in…", "busy");
      try {
        const body = await requestJSON(path, {
          method: "POST",
          json: { email, password },
          authenticated: false,
        });
        $("signup-password").value = "";
        if (await signedIn(body.token)) {
          setStatus(status, action === "signup" ? "Account created: you are signed in." : "Signed in.", "success");
        }
      } catch (error) {
        setStatus(status, describeError(error, "login"), "error");
      }
    });

    onSubmit($("token-form"), async () => {
      const token = $("token-input").value.trim().replace(/^Bearer\s+/i, "");
      if (!token) {
        setStatus(status, "Paste a token first.", "error");
        return;
      }
      setStatus(status, "Checking the token…", "busy");
      $("token-input").value = "";
      if (await signedIn(token)) setStatus(status, "Signed in with the token.", "success");
    });

    $("signout-button").addEventListener("click", () => {
      signedOut("user");
      setStatus(status, "Signed out. The token was forgotten.", "success");
      $("signup-email").focus();
    });

    $("auth-remember").addEventListener("change", () => setToken(auth.token, $("auth-remember").checked));

    let saved = null;
    try {
      saved = sessionStorage.getItem(TOKEN_KEY);
    } catch (_) {
      saved = null;
    }
    if (saved) {
      $("auth-remember").checked = true;
      signedIn(saved);
    } else {
      showUser();
    }
  }

  // --- Business ideas ------------------------------------------------------------------------

  function setUpIdeas() {
    const start = $("ideas-start");
    const stop = $("ideas-stop");
    const status = $("ideas-status");
    const output = $("ideas-output");
    const view = new MarkdownView(output);
    let controller = null;

    start.addEventListener("click", async () => {
      if (controller) return;
      controller = new AbortController();
      setEnabled(stop, true);
      setEnabled(start, false, stop);
      output.setAttribute("aria-busy", "true");
      output.dataset.state = "streaming";
      view.set("");
      view.flush();
      setStatus(status, "Asking for an idea…", "busy");
      let text = "";
      let done = null;
      try {
        const response = await request("/api?format=json", {
          accept: "text/event-stream",
          signal: controller.signal,
        });
        const provider = response.headers.get("X-AIHub-Provider");
        setStatus(status, `Streaming${provider ? ` from ${provider}` : ""}…`, "busy");
        for await (const event of sseEvents(response)) {
          if (event.event === "delta" && event.data) {
            text += event.data.text || "";
            view.set(text);
          } else if (event.event === "done") {
            done = event.data || {};
          } else if (event.event === "error") {
            const data = event.data || {};
            throw new StreamError(data.message, data.code);
          }
        }
        view.set(text);
        if (done) {
          const usage = done.usage || {};
          const tokens = usage.output_tokens ? ` · ${usage.output_tokens} tokens` : "";
          const by = done.provider ? ` · by ${done.provider}${done.model ? `:${done.model}` : ""}` : "";
          setStatus(status, `Done${tokens}${by}.`, "success");
          output.dataset.state = "done";
        } else {
          setStatus(status, "The stream ended before the idea was complete.", "error");
          output.dataset.state = "error";
        }
      } catch (error) {
        view.set(text);
        setStatus(status, describeError(error), error.name === "AbortError" ? "" : "error");
        output.dataset.state = error.name === "AbortError" ? "stopped" : "error";
      } finally {
        view.flush();
        controller = null;
        output.setAttribute("aria-busy", "false");
        setEnabled(start, true);
        setEnabled(stop, false, start);
      }
    });

    stop.addEventListener("click", () => {
      if (controller) controller.abort();
    });

    whenSignedOut.push(() => {
      if (controller) controller.abort();
    });
  }

  // --- Coding challenges ---------------------------------------------------------------------

  function setUpChallenges() {
    const status = $("challenge-status");
    const generate = $("challenge-generate");
    const box = $("challenge");
    const options = $("challenge-options");
    const result = $("challenge-result");
    const quota = $("quota");
    const history = $("history");
    const more = $("history-more");
    let nextCursor = null;
    const LETTERS = ["A", "B", "C", "D"];

    onSubmit($("challenge-form"), async () => {
      if (generate.disabled) return;
      setEnabled(generate, false);
      setStatus(status, "Generating a challenge…", "busy");
      try {
        const challenge = await requestJSON("/api/generate-challenge", {
          method: "POST",
          json: { difficulty: $("challenge-difficulty").value },
        });
        showChallenge(challenge);
        setStatus(status, `A ${challenge.difficulty} challenge: pick an answer.`, "success");
        refreshQuota();
        refreshHistory();
      } catch (error) {
        setStatus(status, describeError(error), "error");
        if (error instanceof ApiError && error.status === 429) refreshQuota();
      } finally {
        setEnabled(generate, true);
      }
    });

    function showChallenge(challenge) {
      box.hidden = false;
      box.dataset.challengeId = challenge.id;
      const title = $("challenge-title");
      title.replaceChildren();
      Markdown.inline(challenge.title || "", title);
      $("challenge-fallback").hidden = !challenge.is_fallback;
      result.replaceChildren();
      result.dataset.state = "unanswered";
      const buttons = (challenge.options || []).map((option, index) => {
        const button = el(
          "button",
          {
            id: `challenge-option-${index}`,
            className: "option",
            attrs: { type: "button", "data-testid": "challenge-option", "data-index": index },
          },
          el("span", { className: "option-letter", text: `${LETTERS[index] || index + 1}.` })
        );
        const label = el("span", { className: "option-text" });
        Markdown.inline(String(option), label);
        button.append(label);
        button.addEventListener("click", () => answer(challenge, index));
        return button;
      });
      options.replaceChildren(...buttons);
      if (buttons[0]) buttons[0].focus();
    }

    function answer(challenge, chosen) {
      const correct = challenge.correct_answer_id;
      const buttons = Array.from(options.querySelectorAll("button"));
      buttons.forEach((button, index) => {
        button.disabled = true;
        if (index === correct) {
          button.classList.add("correct");
          button.append(el("span", { className: "option-mark", text: " ✓ correct answer" }));
        } else if (index === chosen) {
          button.classList.add("wrong");
          button.append(el("span", { className: "option-mark", text: " ✗ your answer" }));
        }
        if (index === chosen) button.setAttribute("aria-pressed", "true");
      });
      const right = chosen === correct;
      result.dataset.state = right ? "right" : "wrong";
      const verdict = right
        ? "Right!"
        : `Not quite: the answer is ${LETTERS[correct] || correct + 1}.`;
      const explanation = el("p", { className: "explanation" });
      Markdown.inline(challenge.explanation || "", explanation);
      result.replaceChildren(
        el("p", { className: right ? "verdict verdict-right" : "verdict verdict-wrong", text: verdict }),
        explanation
      );
      // Focus the result's container so keyboard users continue from here.
      result.setAttribute("tabindex", "-1");
      result.focus();
    }

    async function refreshQuota() {
      if (!auth.token) {
        quota.textContent = "Sign in to see your quota.";
        return;
      }
      try {
        const body = await requestJSON("/api/quota");
        // null means unlimited: never show it as 0.
        const left = body.quota_remaining === null || body.quota_remaining === undefined
          ? "unlimited"
          : String(body.quota_remaining);
        const daily = body.daily_quota === null || body.daily_quota === undefined
          ? ""
          : ` · topped up to ${body.daily_quota} every day (next at ${formatDate(body.next_reset_at)})`;
        quota.textContent = `Challenges left: ${left}${left === "unlimited" ? "" : daily}.`;
        quota.dataset.remaining = left;
      } catch (error) {
        quota.textContent = describeError(error);
      }
    }

    async function refreshHistory(append = false) {
      if (!auth.token) {
        history.replaceChildren();
        more.hidden = true;
        return;
      }
      const cursor = append && nextCursor ? `&cursor=${encodeURIComponent(nextCursor)}` : "";
      try {
        const body = await requestJSON(`/api/my-history?limit=10${cursor}`);
        const items = (body.challenges || []).map(historyItem);
        if (append) history.append(...items);
        else history.replaceChildren(...items);
        if (!history.children.length) {
          history.append(el("li", { className: "hint", text: "No challenges yet." }));
        }
        nextCursor = body.next_cursor || null;
        more.hidden = !nextCursor;
      } catch (error) {
        history.replaceChildren(el("li", { className: "error-text", text: describeError(error) }));
        more.hidden = true;
      }
    }

    function historyItem(challenge) {
      const summary = el("summary");
      Markdown.inline(challenge.title || "", summary);
      summary.append(
        el("span", {
          className: "meta",
          text: ` (${challenge.difficulty}, ${formatDate(challenge.timestamp)}${challenge.is_fallback ? ", built-in" : ""})`,
        })
      );
      const list = el("ol", { className: "history-options", attrs: { type: "A" } });
      (challenge.options || []).forEach((option, index) => {
        const item = el("li");
        Markdown.inline(String(option), item);
        if (index === challenge.correct_answer_id) {
          item.classList.add("correct-text");
          item.append(el("strong", { text: " (correct)" }));
        }
        list.append(item);
      });
      const explanation = el("p");
      Markdown.inline(challenge.explanation || "", explanation);
      return el(
        "li",
        { attrs: { "data-testid": "history-item", "data-challenge-id": challenge.id } },
        el("details", {}, summary, list, explanation)
      );
    }

    $("history-refresh").addEventListener("click", () => {
      refreshHistory();
      refreshQuota();
    });
    more.addEventListener("click", () => refreshHistory(true));

    whenSignedIn.push(() => {
      refreshQuota();
      refreshHistory();
    });
    whenSignedOut.push(() => {
      quota.textContent = "Sign in to see your quota.";
      history.replaceChildren();
      more.hidden = true;
      box.hidden = true;
    });
  }

  // --- Image jobs ----------------------------------------------------------------------------

  function setUpImages() {
    const start = $("images-start");
    const cancel = $("images-cancel");
    const status = $("images-status");
    const grid = $("images-grid");
    const summary = $("images-summary");
    let job = null; // {id, source, prompt, startedAt, slots}

    onSubmit($("images-form"), async () => {
      if (job || start.disabled) return;
      const prompt = $("images-prompt").value.trim();
      const count = parseInt($("images-count").value, 10);
      if (!prompt) {
        setStatus(status, "Type a prompt first.", "error");
        return;
      }
      if (!Number.isInteger(count) || count < 1) {
        setStatus(status, "The number of images must be a whole number, at least 1.", "error");
        return;
      }
      setEnabled(start, false);
      setStatus(status, "Starting the job…", "busy");
      summary.textContent = "";
      summary.dataset.state = "running";
      let created;
      try {
        created = await requestJSON("/api/generate/", {
          method: "POST",
          json: { prompt, num_images: count },
        });
      } catch (error) {
        setStatus(status, describeError(error), "error");
        summary.dataset.state = "error";
        setEnabled(start, true);
        return;
      }
      follow(created, prompt);
    });

    function follow(created, prompt) {
      const total = created.num_images || 1;
      const slots = [];
      for (let index = 0; index < total; index += 1) slots.push(slot(index));
      grid.replaceChildren(...slots.map((s) => s.item));
      const query = created.stream_token ? `?token=${encodeURIComponent(created.stream_token)}` : "";
      const source = new EventSource(`/api/generate/${encodeURIComponent(created.job_id)}/stream${query}`);
      job = { id: created.job_id, source, prompt, startedAt: performance.now(), slots };
      grid.dataset.jobId = created.job_id;
      setEnabled(cancel, true);
      setStatus(status, `Job ${created.job_id} queued: ${total} image${total === 1 ? "" : "s"}.`, "busy");

      source.addEventListener("progress", (event) => {
        const data = parseJSON(event.data);
        if (data && job && job.source === source) progress(data);
      });
      source.addEventListener("done", (event) => {
        source.close();
        finish(parseJSON(event.data) || {});
      });
      source.addEventListener("keepalive", () => {});
      source.addEventListener("error", (event) => {
        if (typeof event.data === "string" && event.data) {
          // The server's own `error` event: the job is gone.
          const data = parseJSON(event.data) || {};
          source.close();
          end(`The job stopped: ${data.error || "unknown error"}.`, "error");
        } else if (source.readyState === EventSource.CLOSED) {
          end("The progress stream closed. Reload the job later from GET /api/generate/.", "error");
        } else {
          setStatus(status, "Connection to the progress stream lost: reconnecting…", "busy");
        }
      });
    }

    function slot(index) {
      const picture = el("div", { className: "image-placeholder", text: "Waiting…" });
      const caption = el("figcaption", { text: `Image ${index + 1}: pending` });
      const item = el(
        "li",
        {
          id: `images-slot-${index}`,
          className: "image-slot",
          attrs: { "data-testid": "image-slot", "data-status": "pending" },
        },
        el("figure", {}, picture, caption)
      );
      return { item, picture, caption };
    }

    function progress(data) {
      const target = job.slots[data.index];
      if (!target) return;
      target.item.dataset.status = data.status;
      const number = data.index + 1;
      if (data.status === "succeeded") {
        const src = safeUrl(data.url, { allowData: true }) || safeUrl(data.file_url);
        const elapsed = typeof data.elapsed_ms === "number"
          ? formatMs(data.elapsed_ms)
          : `≈${formatMs(performance.now() - job.startedAt)} (measured here)`;
        if (src) {
          const image = el("img", {
            attrs: { src, alt: `Image ${number} for “${job.prompt}”`, decoding: "async" },
          });
          target.picture.replaceWith(image);
          target.picture = image;
        }
        target.caption.textContent = `Image ${number}: ready after ${elapsed}`;
        const ready = job.slots.filter((s) => s.item.dataset.status === "succeeded").length;
        setStatus(status, `${ready} of ${job.slots.length} ready…`, "busy");
      } else if (data.status === "failed") {
        target.picture.textContent = "Failed";
        target.picture.classList.add("failed");
        const elapsed = typeof data.elapsed_ms === "number" ? ` after ${formatMs(data.elapsed_ms)}` : "";
        target.caption.textContent = `Image ${number}: failed${elapsed}: ${data.error || "no reason given"}`;
      } else if (data.status === "running") {
        target.picture.textContent = "Generating…";
        target.caption.textContent = `Image ${number}: generating`;
      }
    }

    function finish(done) {
      if (!job) return;
      const parts = [];
      if (done.job_status === "canceled") parts.push("Cancelled.");
      parts.push(`${done.succeeded ?? 0} of ${done.total ?? job.slots.length} images succeeded` +
        (done.failed ? `, ${done.failed} failed.` : "."));
      parts.push(done.ttfi_ms === null || done.ttfi_ms === undefined
        ? "No image was ready."
        : `Time to first image: ${formatMs(done.ttfi_ms)}.`);
      parts.push(`Whole batch: ${formatMs(done.total_ms)}.`);
      summary.textContent = parts.join(" ");
      summary.dataset.state = done.job_status === "canceled" ? "canceled" : "done";
      for (const s of job.slots) {
        if (s.item.dataset.status === "pending" || s.item.dataset.status === "running") {
          s.picture.textContent = "Not generated";
        }
      }
      end(done.job_status === "canceled" ? "The job was cancelled." : "The job is done.", "success");
    }

    function end(message, kind) {
      if (job) job.source.close();
      job = null;
      setStatus(status, message, kind);
      if (kind === "error") summary.dataset.state = "error";
      setEnabled(start, true);
      setEnabled(cancel, false, start);
    }

    cancel.addEventListener("click", async () => {
      if (!job) return;
      const id = job.id;
      setStatus(status, "Cancelling…", "busy");
      try {
        await requestJSON(`/api/generate/${encodeURIComponent(id)}`, { method: "DELETE" });
        // The stream ends with `done` (job_status "canceled").
      } catch (error) {
        setStatus(status, describeError(error), "error");
      }
    });

    whenSignedOut.push(() => {
      if (job) end("Signed out: stopped following the job.", "");
    });
  }

  // --- Chats with files ----------------------------------------------------------------------

  function setUpChats() {
    const list = $("chat-list");
    const heading = $("chat-heading");
    const renameForm = $("chat-rename-form");
    const titleInput = $("chat-title");
    const messages = $("chat-messages");
    const input = $("chat-input");
    const fileInput = $("chat-file");
    const send = $("chat-send");
    const stop = $("chat-stop");
    const status = $("chat-status");
    let chats = [];
    let current = null; // the open chat's id
    let controller = null;

    function chatTitle(chat) {
      return (chat && chat.title) || "Untitled chat";
    }

    async function refreshChats() {
      if (!auth.token) {
        list.replaceChildren();
        return;
      }
      try {
        chats = (await requestJSON("/api/chats")) || [];
      } catch (error) {
        setStatus(status, describeError(error), "error");
        return;
      }
      drawList();
    }

    function drawList() {
      if (!chats.length) {
        list.replaceChildren(el("li", { className: "hint", text: "No chats yet." }));
        return;
      }
      list.replaceChildren(
        ...chats.map((chat) => {
          const button = el(
            "button",
            {
              className: "chat-item",
              attrs: {
                type: "button",
                "data-testid": "chat-item",
                "data-chat-id": chat.chatId,
                "aria-current": chat.chatId === current ? "true" : null,
              },
            },
            el("span", { className: "chat-item-title", text: chatTitle(chat) }),
            el("span", { className: "meta", text: formatDate(chat.updatedAt) })
          );
          button.addEventListener("click", () => openChat(chat.chatId));
          return el("li", {}, button);
        })
      );
      const open = chats.find((chat) => chat.chatId === current);
      if (open) showHeading(open);
    }

    function showHeading(chat) {
      heading.textContent = chat ? chatTitle(chat) : "No chat open";
      renameForm.hidden = !chat;
      if (chat && document.activeElement !== titleInput) titleInput.value = chat.title || "";
    }

    async function openChat(chatId) {
      if (controller) controller.abort();
      current = chatId;
      messages.dataset.chatId = chatId;
      drawList();
      showHeading(chats.find((chat) => chat.chatId === chatId) || { chatId, title: null });
      setStatus(status, "Loading the messages…", "busy");
      try {
        const body = (await requestJSON(`/api/chats/${encodeURIComponent(chatId)}`)) || [];
        messages.replaceChildren(...body.map(storedMessage));
        if (!body.length) messages.append(el("p", { className: "hint", text: "No messages yet: say something." }));
        setStatus(status, `${body.length} message${body.length === 1 ? "" : "s"}.`, "success");
        scrollToEnd(messages);
      } catch (error) {
        setStatus(status, describeError(error), "error");
      }
    }

    function bubble(role, testid = "chat-message") {
      const content = el("div", { className: "message-content" });
      const node = el(
        "article",
        { className: `message message-${role}`, attrs: { "data-testid": testid, "data-role": role } },
        el("p", { className: "message-role", text: role === "user" ? "You" : "Assistant" }),
        content
      );
      return { node, content };
    }

    function attachment(url, type, name, { local = false } = {}) {
      const href = safeUrl(url, { allowData: true, allowBlob: local });
      if (!href) return null;
      if (type && type.startsWith("image/")) {
        return el("img", { className: "attachment", attrs: { src: href, alt: name ? `Attached image ${name}` : "Attached image" } });
      }
      return el("a", { attrs: { href, rel: "noopener noreferrer" }, text: name || "Attached file" });
    }

    function storedMessage(message) {
      const { node, content } = bubble(message.role);
      if (message.role === "assistant") Markdown.render(message.content, content, MESSAGE_HEADINGS);
      else content.append(el("p", { className: "plain", text: message.content }));
      const files = Array.isArray(message.attachments) && message.attachments.length
        ? message.attachments
        : message.media_url ? [{ media_url: message.media_url, media_type: message.media_type }] : [];
      for (const file of files) {
        const shown = attachment(file.media_url, file.media_type, file.filename);
        if (shown) node.append(shown);
      }
      if (message.status && message.status !== "complete") {
        node.append(el("p", { className: "meta", text: `(${message.status})` }));
      }
      return node;
    }

    /** Upload a file: a signed URL, then a PUT of the bytes with no Authorization header. */
    async function upload(file) {
      const target = await requestJSON("/api/upload-url", {
        method: "POST",
        json: { filename: file.name, contentType: file.type || "", size: file.size },
      });
      const contentType = target.content_type || file.type;
      const response = await fetch(target.url, {
        method: "PUT",
        body: file,
        headers: { "Content-Type": contentType },
        credentials: "omit",
      });
      if (!response.ok) throw await errorFrom(response);
      return { gcsUrl: target.gcs_url, contentType };
    }

    onSubmit($("chat-form"), async () => {
      if (controller || send.disabled) return;
      const text = input.value.trim();
      const file = fileInput.files && fileInput.files[0];
      if (!text && !file) {
        setStatus(status, "Type a message or attach an image first.", "error");
        return;
      }
      if (!auth.token) {
        setStatus(status, describeError(new NotSignedIn()), "error");
        return;
      }
      controller = new AbortController();
      setEnabled(stop, true);
      setEnabled(send, false, stop);
      messages.dataset.state = "sending";
      messages.setAttribute("aria-busy", "true");
      let preview = null;
      try {
        const parts = text ? [{ text }] : [];
        if (file) {
          setStatus(status, `Uploading ${file.name}…`, "busy");
          const uploaded = await upload(file);
          const kind = uploaded.contentType.split("/")[0] || "file";
          parts.push({ text: uploaded.gcsUrl, type: kind, mimeType: uploaded.contentType });
          preview = URL.createObjectURL(file);
        }
        if (!current || messages.querySelector(".hint")) messages.replaceChildren();
        const mine = bubble("user");
        if (text) mine.content.append(el("p", { className: "plain", text }));
        if (preview) {
          const shown = attachment(preview, file.type, file.name, { local: true });
          if (shown) mine.node.append(shown);
        }
        messages.append(mine.node);
        input.value = "";
        fileInput.value = "";
        const reply = bubble("assistant");
        reply.node.dataset.state = "streaming";
        messages.append(reply.node);
        scrollToEnd(messages);
        const view = new MarkdownView(reply.content, MESSAGE_HEADINGS);
        setStatus(status, "Waiting for the reply…", "busy");
        const response = await request("/chat", {
          method: "POST",
          json: { messages: [{ role: "user", parts }], chatId: current },
          accept: "application/x-ndjson",
          signal: controller.signal,
        });
        let replyText = "";
        let done = false;
        try {
          for await (const line of ndjsonObjects(response)) {
            if (line.chat_id && !current) {
              current = line.chat_id;
              messages.dataset.chatId = current;
            }
            if (typeof line.response === "string") {
              replyText += line.response;
              view.set(replyText);
              scrollToEnd(messages);
              setStatus(status, "Replying…", "busy");
            }
            if (line.error) throw new StreamError(line.error, line.code);
            if (line.done) done = true;
          }
        } finally {
          view.flush();
          scrollToEnd(messages);
        }
        reply.node.dataset.state = done ? "done" : "error";
        messages.dataset.state = done ? "done" : "error";
        setStatus(status, done ? "Reply complete." : "The reply ended early.", done ? "success" : "error");
      } catch (error) {
        messages.dataset.state = "error";
        const last = messages.lastElementChild;
        if (last && last.dataset.state === "streaming") last.dataset.state = "error";
        setStatus(status, describeError(error), error.name === "AbortError" ? "" : "error");
      } finally {
        controller = null;
        messages.setAttribute("aria-busy", "false");
        setEnabled(send, true);
        setEnabled(stop, false, send);
        await refreshChats();
        if (current) showHeading(chats.find((chat) => chat.chatId === current));
      }
    });

    stop.addEventListener("click", () => {
      if (controller) controller.abort();
    });

    sendOnCtrlEnter(input, send);

    $("chat-new").addEventListener("click", async () => {
      setStatus(status, "Creating a chat…", "busy");
      try {
        const created = await requestJSON("/api/chats/create", { method: "POST", json: { title: null } });
        await refreshChats();
        await openChat(created.chat_id);
        setStatus(status, "New chat created: type your first message.", "success");
        input.focus();
      } catch (error) {
        setStatus(status, describeError(error), "error");
      }
    });

    $("chat-refresh").addEventListener("click", async () => {
      await refreshChats();
      setStatus(status, "Chats refreshed.", "success");
    });

    onSubmit(renameForm, async () => {
      if (!current) return;
      const title = titleInput.value.trim();
      if (!title) {
        setStatus(status, "Type a title first.", "error");
        return;
      }
      try {
        await requestJSON(`/api/chats/${encodeURIComponent(current)}`, { method: "PATCH", json: { title } });
        await refreshChats();
        setStatus(status, `Renamed to “${title}”.`, "success");
      } catch (error) {
        setStatus(status, describeError(error), "error");
      }
    });

    $("chat-delete").addEventListener("click", async () => {
      if (!current) return;
      const id = current;
      const title = titleInput.value.trim() || "this chat";
      if (!window.confirm(`Delete “${title}” with all its messages and files? This cannot be undone.`)) return;
      try {
        await requestJSON(`/api/chats/${encodeURIComponent(id)}`, { method: "DELETE" });
        closeChat();
        await refreshChats();
        setStatus(status, "Chat deleted, with its messages and files.", "success");
        $("chat-new").focus();
      } catch (error) {
        setStatus(status, describeError(error), "error");
      }
    });

    function closeChat() {
      if (controller) controller.abort();
      current = null;
      delete messages.dataset.chatId;
      showHeading(null);
      messages.replaceChildren(el("p", { className: "hint", text: "Send a message to start a chat, or open one from the list." }));
    }

    whenSignedIn.push(refreshChats);
    whenSignedOut.push(() => {
      closeChat();
      chats = [];
      list.replaceChildren();
    });
  }

  // --- Bring your own key --------------------------------------------------------------------

  function fillModels(models) {
    const select = $("byok-model");
    const chosen = select.value;
    select.replaceChildren(...models.map((model) => el("option", { text: model, attrs: { value: model } })));
    if (models.includes(chosen)) select.value = chosen;
  }

  function setUpByok() {
    const keyInput = $("byok-key");
    const input = $("byok-input");
    const send = $("byok-send");
    const stop = $("byok-stop");
    const output = $("byok-output");
    const status = $("byok-status");
    let history = []; // [{role: "user" | "ai", content}], this page's memory only
    let controller = null;

    function bubble(role) {
      const content = el("div", { className: "message-content" });
      const node = el(
        "article",
        { className: `message message-${role === "user" ? "user" : "assistant"}`, attrs: { "data-testid": "byok-message", "data-role": role } },
        el("p", { className: "message-role", text: role === "user" ? "You" : "Assistant" }),
        content
      );
      return { node, content };
    }

    send.addEventListener("click", async () => {
      if (controller) return;
      // The key is read from the field for this request only: never stored, never logged.
      const apiKey = keyInput.value.trim();
      const message = input.value.trim();
      if (!apiKey) {
        setStatus(status, "Type your OpenAI API key first (it starts with sk-).", "error");
        keyInput.focus();
        return;
      }
      if (!message) {
        setStatus(status, "Type a message first.", "error");
        input.focus();
        return;
      }
      const sse = $("byok-sse").checked;
      controller = new AbortController();
      setEnabled(stop, true);
      setEnabled(send, false, stop);
      output.setAttribute("aria-busy", "true");
      output.dataset.state = "streaming";
      const mine = bubble("user");
      mine.content.append(el("p", { className: "plain", text: message }));
      const reply = bubble("ai");
      output.append(mine.node, reply.node);
      scrollToEnd(output);
      const view = new MarkdownView(reply.content, MESSAGE_HEADINGS);
      setStatus(status, "Sending to OpenAI…", "busy");
      let text = "";
      try {
        const response = await request("/api/chat", {
          method: "POST",
          authenticated: false,
          accept: sse ? "text/event-stream" : "text/plain",
          signal: controller.signal,
          json: {
            developer_message: $("byok-system").value,
            user_message: message,
            chat_history: history,
            model: $("byok-model").value,
            api_key: apiKey,
          },
        });
        let complete = !sse; // plain text has no end marker: a cut reply says so in its text
        if (sse) {
          for await (const event of sseEvents(response)) {
            if (event.event === "delta" && event.data) {
              text += event.data.text || "";
              view.set(text);
              scrollToEnd(output);
            } else if (event.event === "done") {
              complete = true;
            } else if (event.event === "error") {
              const data = event.data || {};
              throw new StreamError(data.message, data.code);
            }
          }
        } else {
          for await (const chunk of textChunks(response)) {
            text += chunk;
            view.set(text);
            scrollToEnd(output);
          }
        }
        view.flush();
        if (complete) {
          history.push({ role: "user", content: message }, { role: "ai", content: text });
          input.value = "";
        }
        output.dataset.state = complete ? "done" : "error";
        setStatus(status, complete ? "Reply complete." : "The reply ended early.", complete ? "success" : "error");
      } catch (error) {
        view.flush();
        if (!text) reply.node.remove();
        mine.node.dataset.state = "error";
        mine.node.append(el("p", { className: "meta", text: "Not answered: this message is not kept in the conversation." }));
        output.dataset.state = error.name === "AbortError" ? "stopped" : "error";
        setStatus(status, describeError(error, "byok"), error.name === "AbortError" ? "" : "error");
      } finally {
        controller = null;
        output.setAttribute("aria-busy", "false");
        setEnabled(send, true);
        setEnabled(stop, false, send);
        scrollToEnd(output);
      }
    });

    stop.addEventListener("click", () => {
      if (controller) controller.abort();
    });

    $("byok-clear").addEventListener("click", () => {
      if (controller) controller.abort();
      history = [];
      output.replaceChildren();
      delete output.dataset.state;
      setStatus(status, "Conversation cleared.", "success");
    });

    sendOnCtrlEnter(input, send);
  }

  // --- Usage ---------------------------------------------------------------------------------

  function setUpUsage() {
    const status = $("usage-status");
    const body = $("usage-body");
    const caption = $("usage-caption");

    async function refreshUsage() {
      if (!auth.token) {
        body.replaceChildren();
        caption.textContent = "Sign in and press “Show usage”.";
        return;
      }
      let days = parseInt($("usage-days").value, 10);
      if (!Number.isInteger(days) || days < 1) days = 30;
      days = Math.min(days, 365);
      setStatus(status, "Loading usage…", "busy");
      try {
        const usage = await requestJSON(`/api/usage?days=${days}`);
        body.replaceChildren(...(usage.products || []).map(row));
        caption.textContent = `Your usage over the last ${days} day${days === 1 ? "" : "s"} (since ${formatDate(usage.since)}), and what is left now.`;
        setStatus(status, "Usage loaded.", "success");
      } catch (error) {
        setStatus(status, describeError(error), "error");
      }
    }

    function row(entry) {
      const quota = entry.quota || {};
      const used = entry.usage || {};
      const unlimited = quota.unlimited || quota.remaining === null || quota.remaining === undefined;
      const left = unlimited ? "unlimited" : String(quota.remaining);
      const daily = quota.daily === null || quota.daily === undefined ? "—" : String(quota.daily);
      const next = quota.next_reset_at ? ` (next ${formatDate(quota.next_reset_at)})` : "";
      const cells = [
        left,
        unlimited ? "—" : `${daily}${next}`,
        formatNumber(used.requests),
        formatNumber(used.succeeded),
        formatNumber(used.failed),
        `${formatNumber(used.input_tokens)} / ${formatNumber(used.output_tokens)}`,
        formatNumber(used.images),
      ];
      return el(
        "tr",
        { attrs: { "data-testid": `usage-row-${entry.product}` } },
        el("th", { attrs: { scope: "row" }, text: PRODUCTS[entry.product] || entry.product }),
        ...cells.map((text) => el("td", { text }))
      );
    }

    onSubmit($("usage-form"), refreshUsage);
    whenSignedIn.push(refreshUsage);
    whenSignedOut.push(() => {
      body.replaceChildren();
      caption.textContent = "Sign in and press “Show usage”.";
      setStatus(status, "");
    });
  }

  // ------------------------------------------------------------------------------------------
  // 8. Start-up
  // ------------------------------------------------------------------------------------------

  function start() {
    $("providers-refresh").addEventListener("click", loadProviders);
    setUpIdeas();
    setUpChallenges();
    setUpImages();
    setUpChats();
    setUpByok();
    setUpUsage();
    setUpAccount(); // last: a remembered token signs in, and every section refreshes
    loadProviders();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
