// Streaming an answer from the gateway. Every way here calls
//   onDelta(text, eventId)  for each piece of the answer, in order, exactly once, with the id
//                           of its event (the page keeps it beside the text, to resume from it);
//   onState(state)          "streaming" | "reconnecting";
//   onStream(id)            with the stream's id (for Stop, other tabs, and a reload);
// and resolves at [DONE], or rejects with a GatewayError.
import { fetchEventSource } from "@microsoft/fetch-event-source";
import { GatewayError, errorOf } from "./api.js";

const MAX_RESUMES = 5; // resumes in a row without a new event before the page gives up
const RESUME_DELAY_MS = 500;

// An error frame: a failure after the stream started. Its event id tells a resumed stream whose
// log ends with it (the same id again) from a connection that was merely cut.
export class ErrorFrame extends GatewayError {
  constructor(error, eventId) {
    super(error.message || "The answer failed.", 0, error.code || null);
    this.eventId = eventId;
  }
}

// The browser gave up on the connection (EventSource closed by itself): resume another way.
class Lost extends Error {}

// The text of one chunk; throws on an error frame.
function deltaOf(data, eventId) {
  const chunk = JSON.parse(data);
  if (chunk.error) throw new ErrorFrame(chunk.error, eventId);
  return (chunk.choices || []).map((choice) => (choice.delta && choice.delta.content) || "").join("");
}

// EventSource can only GET: POST /v1/streams first (the Idempotency-Key makes a retried POST
// attach to the same stream), then open its URL with the read token. After a network break the
// browser reconnects by itself, sending Last-Event-ID, and the gateway replays what was missed.
async function viaEventSource(body, idempotencyKey, { onDelta, onState, onStream }) {
  const response = await fetch("/v1/streams", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  if (!response.ok) throw await errorOf(response);
  const stream = await response.json();
  onStream(stream.id);
  return new Promise((resolve, reject) => {
    const source = new EventSource(stream.url);
    window.lastEventSource = source; // for the browser tests
    source.onopen = () => onState("streaming");
    source.onmessage = (event) => {
      if (event.data === "[DONE]") {
        source.close();
        resolve();
        return;
      }
      try {
        onDelta(deltaOf(event.data, event.lastEventId), event.lastEventId);
      } catch (err) {
        source.close();
        reject(err);
      }
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) reject(new Lost()); // it gave up (a token expired during a long outage, say)
      else onState("reconnecting"); // the browser retries by itself
    };
  });
}

class RetryLater extends Error {}

// fetch streaming (@microsoft/fetch-event-source). After a network break it sends the same
// request again with Last-Event-ID: a POST attaches to the same stream by its Idempotency-Key;
// a GET of /v1/streams/<id> goes on after that id.
function viaFetch(url, init, { onDelta, onState, onStream }) {
  const controller = new AbortController();
  let done = false;
  return new Promise((resolve, reject) => {
    const finish = () => {
      done = true;
      controller.abort();
      resolve();
    };
    fetchEventSource(url, {
      ...init,
      credentials: "same-origin",
      signal: controller.signal,
      openWhenHidden: true, // a tab in the background keeps its answer
      async onopen(response) {
        if (response.status === 204) return finish(); // the page already has every event, [DONE] included
        const type = response.headers.get("Content-Type") || "";
        if (response.ok && type.startsWith("text/event-stream")) {
          const id = response.headers.get("X-Stream-Id");
          if (id) onStream(id);
          onState("streaming");
          return;
        }
        throw await errorOf(response); // a status: retrying would not change it
      },
      onmessage(event) {
        if (done) return;
        if (event.data === "[DONE]") return finish();
        onDelta(deltaOf(event.data, event.id), event.id);
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
      if (!done) reject(err);
    });
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Start an answer (`start` = {transport, body, idempotencyKey}) or follow one already running
// (`streamId` and the `lastEventId` the page has: after a reload, in a second tab). A stream
// cut by a gateway that shut down (error `gateway_restarting`) or given up by the browser is
// resumed from the last event the page has, through whichever instance answers now; when the
// stream's own log ends with that error, the error stands.
export async function streamAnswer({ start = null, streamId = null, lastEventId = null }, handlers) {
  let id = streamId;
  let last = lastEventId;
  let fresh = 0; // resumes since the last new event
  const tracked = {
    ...handlers,
    onDelta(text, eventId) {
      last = eventId;
      fresh = 0;
      handlers.onDelta(text, eventId);
    },
    onStream(sid) {
      id = sid;
      handlers.onStream(sid);
    },
  };
  let restartSeen = null;
  let first = start !== null && id === null;
  for (;;) {
    try {
      if (first) {
        first = false;
        if (start.transport === "fetch") {
          const init = { method: "POST", headers: { "Content-Type": "application/json", "Idempotency-Key": start.idempotencyKey }, body: JSON.stringify(start.body) };
          await viaFetch("/v1/chat/completions", init, tracked);
        } else {
          await viaEventSource(start.body, start.idempotencyKey, tracked);
        }
      } else {
        // Lower case, the name fetch-event-source itself sets on a reconnect: one header, not two
        // merged into "<old>, <new>".
        const headers = last ? { "last-event-id": last } : {};
        await viaFetch(`/v1/streams/${encodeURIComponent(id)}`, { method: "GET", headers }, tracked);
      }
      return;
    } catch (err) {
      const restarted = err instanceof ErrorFrame && err.code === "gateway_restarting" && err.eventId !== restartSeen;
      if (!id || !(restarted || err instanceof Lost) || ++fresh > MAX_RESUMES) throw err instanceof Lost ? new GatewayError("The connection to the answer was lost.") : err;
      if (restarted) restartSeen = err.eventId;
      handlers.onState("reconnecting");
      await sleep(RESUME_DELAY_MS);
    }
  }
}
