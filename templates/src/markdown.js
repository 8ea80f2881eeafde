// Markdown for model output, rendered safely: markdown-it escapes any HTML in the text
// (html: false) and refuses javascript: links; DOMPurify then checks the result once more.
// Model output is untrusted input: it must never become markup of its own.
import MarkdownIt from "markdown-it";
import DOMPurify from "dompurify";

const markdown = new MarkdownIt({ html: false, linkify: true, breaks: true });

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

export function renderMarkdown(text) {
  return DOMPurify.sanitize(markdown.render(text));
}
