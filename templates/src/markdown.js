// Markdown for model output, rendered safely: markdown-it escapes any HTML in the text
// (html: false) and refuses javascript: links; DOMPurify then checks the result once more.
// Model output is untrusted input: it must never become markup of its own.
// Code blocks are highlighted (highlight.js, a few common languages: its class names only, no
// inline style, so the strict style-src policy holds) and get a copy button, which the page
// handles by delegation (see copyCode).
import MarkdownIt from "markdown-it";
import DOMPurify from "dompurify";
import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import c from "highlight.js/lib/languages/c";
import cpp from "highlight.js/lib/languages/cpp";
import css from "highlight.js/lib/languages/css";
import go from "highlight.js/lib/languages/go";
import java from "highlight.js/lib/languages/java";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import python from "highlight.js/lib/languages/python";
import rust from "highlight.js/lib/languages/rust";
import sql from "highlight.js/lib/languages/sql";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";

const LANGUAGES = { bash, c, cpp, css, go, java, javascript, json, python, rust, sql, typescript, xml, yaml };
for (const [name, language] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, language);

const escape = (text) => text.replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch]);

function highlight(code, info) {
  const name = (info || "").trim().split(/\s+/)[0].toLowerCase();
  if (name && hljs.getLanguage(name)) return hljs.highlight(code, { language: name, ignoreIllegals: true }).value;
  return escape(code);
}

const markdown = new MarkdownIt({ html: false, linkify: true, breaks: true });

// A code block: its language, a copy button, then the highlighted code.
markdown.renderer.rules.fence = (tokens, index) => {
  const token = tokens[index];
  const name = (token.info || "").trim().split(/\s+/)[0];
  const label = name ? escape(name) : "code";
  return (
    `<div class="code-block"><div class="code-head"><span>${label}</span>` +
    `<button type="button" class="copy" aria-label="Copy code">Copy</button></div>` +
    `<pre><code class="hljs">${highlight(token.content, name)}</code></pre></div>`
  );
};

// Wide tables scroll sideways on a phone instead of widening the page.
markdown.renderer.rules.table_open = () => '<div class="table-wrap"><table>';
markdown.renderer.rules.table_close = () => "</table></div>";

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

export function renderMarkdown(text) {
  return DOMPurify.sanitize(markdown.render(text));
}

// The click on a code block's copy button (delegated from the conversation): its code as text.
export async function copyCode(button) {
  const code = button.closest(".code-block")?.querySelector("pre")?.textContent ?? "";
  try {
    await navigator.clipboard.writeText(code);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed"; // no clipboard outside a secure context (http on a LAN address)
  }
  setTimeout(() => (button.textContent = "Copy"), 1500);
}
