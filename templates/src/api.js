// The gateway's JSON API, and the errors a person should understand.

export class GatewayError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// What to tell the user for a failed response: the gateway's own message, put plainly.
export async function errorOf(response) {
  let detail = null;
  try {
    detail = (await response.json()).error;
  } catch {
    // not JSON: an error page of a proxy, say
  }
  const message = detail && detail.message ? detail.message : response.statusText;
  const status = response.status;
  let text;
  if (status === 401) text = `Not signed in: ${message}`;
  else if (status === 403) text = `Not allowed: ${message}`;
  else if (status === 429) {
    const wait = response.headers.get("Retry-After");
    text = `Too many requests${wait ? `; try again in ${wait} s` : ""}: ${message}`;
  } else if (status >= 500) text = `The service failed (${status}): ${message}`;
  else text = message;
  return new GatewayError(text, status, detail && detail.code);
}

export async function request(method, path, body = undefined, headers = {}) {
  const response = await fetch(path, {
    method,
    headers: body === undefined ? headers : { "Content-Type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

export const listModels = () => request("GET", "/v1/models");
export const signIn = (key) => request("POST", "/v1/session", undefined, { Authorization: `Bearer ${key}` });
export const signOut = () => request("DELETE", "/v1/session");
// Who is signed in (the session cookie is HttpOnly): null when nobody is.
export async function currentUser() {
  try {
    return (await request("GET", "/v1/session")).user;
  } catch (err) {
    if (err instanceof GatewayError && err.status === 401) return null;
    throw err;
  }
}
export const stopStream = (id) => request("DELETE", `/v1/streams/${encodeURIComponent(id)}`);

// One key per question: a retried POST attaches to the answer already being generated.
export function newIdempotencyKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID(); // secure contexts only
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}
