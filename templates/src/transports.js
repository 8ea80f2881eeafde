// Two ways to stream an answer from the gateway. Both call:
//   onDelta(text)   for each piece of the answer, in order, exactly once;
//   onState(state)  "streaming" | "reconnecting";
//   onStream(id)    with the stream's id, for Stop;
// and resolve at [DONE], or reject with a GatewayError.
import { fetchEventSource } from "@microsoft/fetch-event-source";
import { GatewayError, errorOf } from "./api.js";

// The text of one chunk; throws on an error frame (a failure after the stream started).
function deltaOf(data) {
  const chunk = JSON.parse(data);
  if (chunk.error) throw new GatewayError(chunk.error.message || "The answer failed.", 0, chunk.error.code);
  return (chunk.choices || []).map((choice) => (choice.delta && choice.delta.content) || "").join("");
}

// EventSource can only GET: POST /v1/streams first, then open the URL with its read token.
// After a network break the browser reconnects by itself, sending Last-Event-ID, and the
// gateway replays exactly what was missed.
export async function viaEventSource(body, { idempotencyKey, onDelta, onState, onStream }) {
  const start = async () => {
    const response = await fetch("/v1/streams", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    if (!response.ok) throw await errorOf(response);
    return response.json();
  };
  const stream = await start();
  onStream(stream.id);
  let lastEventId = null;
  let reopened = false;

  return new Promise((resolve, reject) => {
    const open = (url) => {
      const source = new EventSource(url);
      window.lastEventSource = source; // for the browser tests
      source.onopen = () => onState("streaming");
      source.onmessage = (event) => {
        lastEventId = event.lastEventId || lastEventId;
        if (event.data === "[DONE]") {
          source.close();
          resolve();
          return;
        }
        try {
          onDelta(deltaOf(event.data));
        } catch (err) {
          source.close();
          reject(err);
        }
      };
      source.onerror = async () => {
        if (source.readyState !== EventSource.CLOSED) {
          onState("reconnecting"); // the browser retries by itself
          return;
        }
        // The browser gave up (the read token expired during a long outage, say). Once, ask
        // for a fresh token for the same stream (same Idempotency-Key) and resume.
        if (reopened || lastEventId === null) {
          reject(new GatewayError("The connection to the answer was lost."));
          return;
        }
        reopened = true;
        try {
          const fresh = await start();
          open(`${fresh.url}&last_event_id=${encodeURIComponent(lastEventId)}`);
        } catch (err) {
          reject(err);
        }
      };
    };
    open(stream.url);
  });
}

class RetryLater extends Error {}

// fetch POST streaming (@microsoft/fetch-event-source). After a network break it sends the
// same POST again with Last-Event-ID; the Idempotency-Key makes the gateway attach that retry
// to the same stream, from after that id.
export function viaFetch(body, { idempotencyKey, onDelta, onState, onStream }) {
  const controller = new AbortController();
  let done = false;
  return new Promise((resolve, reject) => {
    fetchEventSource("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey },
      body: JSON.stringify(body),
      signal: controller.signal,
      openWhenHidden: true,
      async onopen(response) {
        const type = response.headers.get("Content-Type") || "";
        if (response.ok && type.startsWith("text/event-stream")) {
          onStream(response.headers.get("X-Stream-Id"));
          onState("streaming");
          return;
        }
        throw await errorOf(response); // a status: retrying would not change it
      },
      onmessage(event) {
        if (event.data === "[DONE]") {
          done = true;
          controller.abort();
          resolve();
          return;
        }
        onDelta(deltaOf(event.data));
      },
      onclose() {
        if (!done) throw new RetryLater(); // closed without [DONE]: resume
      },
      onerror(err) {
        if (err instanceof GatewayError) throw err; // stops retrying; rejects below
        onState("reconnecting");
        return 1000; // retry in a second
      },
    }).catch((err) => {
      controller.abort();
      reject(err);
    });
  });
}
