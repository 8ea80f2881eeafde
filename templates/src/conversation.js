// The conversation, kept in the browser (localStorage, one entry per signed-in user), so that a
// reload or a second tab of the page finds it, answers in flight included.
//
// The stored entry is the truth that tabs share: every change is a read-modify-write of it, in
// which a tab changes only what it did (a message it added, the progress of an answer it
// reads), and the `storage` event brings the other tabs' changes. An answer's text and the id
// of the last event that text includes are always written together, so that whoever resumes
// it (this tab after a reload, another tab) asks the gateway for exactly what comes next.
//
// A message: {id, role: "user" | "assistant", content, status, error?, stream?}
//   user status:      "sent" | "failed" (the question never got an answer; Retry sends it again)
//   assistant status: "streaming" | "done" | "stopped" | "failed" | "interrupted"
//   stream:           {id, lastEventId} of the answer's stream at the gateway

const PREFIX = "sse-gateway:conversation:";
const MAX_MESSAGES = 200;

// The position of an event id `<stream id>:<n>` in its stream (0 before the first).
export const positionOf = (eventId) => (eventId ? Number(eventId.slice(eventId.lastIndexOf(":") + 1)) || 0 : 0);

export function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID(); // secure contexts only
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export class ConversationStore {
  constructor(user) {
    this.key = PREFIX + encodeURIComponent(user || "anonymous");
  }

  read() {
    try {
      const stored = JSON.parse(localStorage.getItem(this.key));
      return Array.isArray(stored?.messages) ? stored.messages : [];
    } catch {
      return []; // not JSON (written by something else): start afresh rather than fail
    }
  }

  // Apply `edit(messages)` to what is stored now and store the result; returns it.
  change(edit) {
    const messages = this.read();
    edit(messages);
    this.#write(messages);
    return messages;
  }

  #write(messages) {
    let kept = messages.slice(-MAX_MESSAGES);
    for (;;) {
      try {
        localStorage.setItem(this.key, JSON.stringify({ messages: kept }));
        return;
      } catch {
        if (kept.length <= 2) return; // storage full or refused: the page goes on without it
        kept = kept.slice(Math.ceil(kept.length / 2)); // the oldest half goes
      }
    }
  }

  // Calls `onChange(messages)` when another tab changes the conversation; returns the unsubscribe.
  watch(onChange) {
    const listener = (event) => {
      if (event.key === this.key || event.key === null) onChange(this.read());
    };
    window.addEventListener("storage", listener);
    return () => window.removeEventListener("storage", listener);
  }
}

// The progress of an answer, written only when it is further along than what is stored (two tabs
// reading the same answer both write it; the one behind must not take the text back).
export function recordProgress(messages, id, content, lastEventId) {
  const message = messages.find((m) => m.id === id);
  if (!message || !message.stream) return;
  if (positionOf(lastEventId) > positionOf(message.stream.lastEventId)) {
    message.content = content;
    message.stream.lastEventId = lastEventId;
  }
}

// What goes to the model with a question: the turns that were answered, without failed questions.
export function historyOf(messages) {
  return messages
    .filter((m) => (m.role === "user" ? m.status !== "failed" : m.content))
    .map(({ role, content }) => ({ role, content }));
}
