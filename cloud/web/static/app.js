// fieldlink dashboard page (docs/web-dashboard.md). It subscribes to the cloud's dashboard
// topics over MQTT-over-WebSocket with MQTT.js (global `mqtt`, vendor/mqtt.min.js) and draws
// sites -> gateways -> devices with their latest values, and the alerts that fire.
// Retained messages rebuild the whole view on every (re)connect; live ones keep it current.
// Everything that comes from the broker reaches the page through textContent, never as HTML.
"use strict";

const SEVERITY_RANK = { critical: 0, major: 1, minor: 2, warning: 3, info: 4 };
const SHOWN_ALERT_STATES = { firing: 0, pending: 1 }; // resolved (or cleared) alerts drop out

const model = { sites: new Map(), alerts: new Map() };
let renderTimer = null;

// --- small DOM helpers -------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "className") node.className = value;
    else if (key === "title") node.title = String(value);
    else node.dataset[key] = String(value); // data-* attributes: what tests and CSS select on
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(state) {
  return el("span", { className: "badge state", state }, state);
}

function byName(a, b) {
  return a.name.localeCompare(b.name);
}

function clock(ts) {
  return typeof ts === "number" ? new Date(ts).toLocaleTimeString() : "";
}

function formatValue(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(Math.abs(value) >= 100 ? 1 : 2);
  return String(value);
}

// --- the model: what the retained and live messages say ----------------------------------

function siteOf(name) {
  if (!model.sites.has(name)) model.sites.set(name, { name, gateways: new Map() });
  return model.sites.get(name);
}

function gatewayOf(site, name) {
  const gateways = siteOf(site).gateways;
  if (!gateways.has(name)) gateways.set(name, { name, status: null, devices: new Map() });
  return gateways.get(name);
}

function deviceOf(site, gateway, name) {
  const devices = gatewayOf(site, gateway).devices;
  if (!devices.has(name)) devices.set(name, { name, status: null, latest: null });
  return devices.get(name);
}

// Topics under the prefix: <site>/<gw>/<dev>/latest, <site>/<gw>/<dev>/status,
// <site>/<gw>/status, <site>/alerts/<key>. An empty payload is a cleared retained message.
function apply(prefix, topic, payload) {
  // Check the prefix: amqtt 0.12 also hands a new connection the retained messages that
  // match *other* clients' subscriptions (the gateways' raw fl/... statuses, say).
  if (!topic.startsWith(`${prefix}/`)) return;
  const levels = topic.slice(prefix.length + 1).split("/");
  const text = new TextDecoder().decode(payload);
  let body = null;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch (err) {
      console.warn("not JSON, ignored:", topic, err.message);
      return;
    }
    if (typeof body !== "object" || body === null) return;
  }
  const [site, second, third, fourth] = levels;
  if (levels.length === 3 && second === "alerts") {
    const key = `${site}/${third}`;
    if (body && body.state in SHOWN_ALERT_STATES) model.alerts.set(key, { key, ...body });
    else model.alerts.delete(key);
  } else if (levels.length === 4 && fourth === "latest") {
    deviceOf(site, second, third).latest = body;
  } else if (levels.length === 4 && fourth === "status") {
    deviceOf(site, second, third).status = body;
  } else if (levels.length === 3 && third === "status") {
    gatewayOf(site, second).status = body;
  } else {
    return;
  }
  scheduleRender();
}

// --- drawing -----------------------------------------------------------------------------

function scheduleRender() {
  // Coalesce a burst (every retained message arrives at once on connect) into one redraw.
  if (renderTimer === null) renderTimer = setTimeout(render, 50);
}

function render() {
  renderTimer = null;
  renderAlerts();
  renderSites();
}

function renderAlerts() {
  const alerts = [...model.alerts.values()].sort(
    (a, b) =>
      SHOWN_ALERT_STATES[a.state] - SHOWN_ALERT_STATES[b.state] ||
      (SEVERITY_RANK[a.severity] ?? 9) - (SEVERITY_RANK[b.severity] ?? 9) ||
      String(a.since).localeCompare(String(b.since)),
  );
  document.getElementById("alert-count").textContent = String(alerts.length);
  document.getElementById("no-alerts").hidden = alerts.length > 0;
  document.getElementById("alerts").replaceChildren(
    ...alerts.map((a) => {
      const where = [a.site, a.gateway, a.device].filter(Boolean).join(" / ");
      const reading = a.value === undefined || a.value === null ? "" : `${formatValue(a.value)} ${a.unit || ""}`.trim();
      const acked = a.acknowledged_by ? `acknowledged by ${a.acknowledged_by}` : null;
      return el(
        "li",
        { className: "alert", alert: a.key, state: a.state, severity: a.severity, acknowledged: a.acknowledged_by ? "yes" : "no" },
        el("span", { className: "sev" }, a.severity || "alert"),
        badge(a.state),
        " ",
        el("span", { className: "summary" }, a.summary || a.rule || a.key),
        el(
          "div",
          { className: "meta" },
          [where, a.rule, reading && `value ${reading}`, a.since && `since ${new Date(a.since).toLocaleString()}`]
            .filter(Boolean)
            .join(" · "),
          acked ? " · " : null,
          acked ? el("strong", { className: "ack" }, acked) : null,
        ),
      );
    }),
  );
}

function renderDevice(site, gateway, device) {
  const state = device.status ? device.status.state : "unknown";
  const values = (device.latest && device.latest.values) || {};
  const rows = Object.keys(values)
    .sort()
    .map((metric) => {
      const v = values[metric] || {};
      return el(
        "tr",
        { metric, quality: v.quality },
        el("th", {}, metric),
        el("td", { className: "value", title: v.time }, formatValue(v.value)),
        el("td", { className: "unit" }, v.unit || ""),
      );
    });
  const updated = device.latest ? device.latest.ts : null;
  return el(
    "article",
    { className: "device", device: `${site}/${gateway}/${device.name}`, state },
    el(
      "header",
      {},
      el("h4", {}, device.name),
      badge(state),
      device.status && device.status.reason ? el("span", { className: "reason" }, device.status.reason) : null,
    ),
    el("table", { className: "values" }, el("tbody", {}, ...rows)),
    el("div", { className: "updated", ts: updated }, updated ? `updated ${clock(updated)}` : "no values yet"),
  );
}

function renderSites() {
  const sites = [...model.sites.values()].sort(byName);
  const main = document.getElementById("sites");
  if (sites.length === 0) {
    main.replaceChildren(el("p", { className: "quiet" }, "Waiting for the first values…"));
    return;
  }
  main.replaceChildren(
    ...sites.map((site) => {
      const gateways = [...site.gateways.values()].sort(byName);
      const devices = gateways.flatMap((g) => [...g.devices.values()]);
      const online = devices.filter((d) => d.status && d.status.state === "online").length;
      return el(
        "section",
        { className: "site", site: site.name },
        el("h2", {}, site.name, el("span", { className: "count" }, `${online}/${devices.length} devices online`)),
        ...gateways.map((g) => {
          const state = g.status ? g.status.state : "unknown";
          return el(
            "div",
            { className: "gateway", gateway: `${site.name}/${g.name}`, state },
            el(
              "header",
              {},
              el("h3", {}, g.name),
              badge(state),
              g.status && g.status.reason ? el("span", { className: "reason" }, g.status.reason) : null,
            ),
            el("div", { className: "devices" }, ...[...g.devices.values()].sort(byName).map((d) => renderDevice(site.name, g.name, d))),
          );
        }),
      );
    }),
  );
}

// --- connection --------------------------------------------------------------------------

function setConnection(state, detail) {
  const node = document.getElementById("connection");
  node.dataset.state = state;
  node.textContent = state;
  node.title = detail || "";
}

function fail(message) {
  const node = document.getElementById("error");
  node.textContent = message;
  node.hidden = false;
  setConnection("error", message);
}

async function main() {
  if (typeof mqtt === "undefined") {
    fail("The MQTT client (vendor/mqtt.min.js) is not installed: run `make web` where the cloud runs, then reload.");
    return;
  }
  let config;
  try {
    const response = await fetch("config.json", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    config = await response.json();
  } catch (err) {
    fail(`Cannot load config.json from the cloud: ${err.message}`);
    return;
  }
  const prefix = config.prefix;
  const topics = [`${prefix}/+/+/+/latest`, `${prefix}/+/+/+/status`, `${prefix}/+/+/status`, `${prefix}/+/alerts/+`];
  const client = mqtt.connect(config.mqtt_url, {
    clientId: `fieldlink-web-${Math.random().toString(16).slice(2, 10)}`,
    clean: true, // nothing to resume: the retained messages are the state
    reconnectPeriod: 2000,
    connectTimeout: 10000,
  });
  client.on("connect", () => {
    setConnection("connected", config.mqtt_url);
    model.sites.clear(); // the retained messages that follow are the whole state again
    model.alerts.clear();
    scheduleRender();
    client.subscribe(topics, { qos: 1 }, (err) => {
      if (err) fail(`Subscribing failed: ${err.message}`);
    });
  });
  client.on("reconnect", () => setConnection("reconnecting", config.mqtt_url));
  client.on("offline", () => setConnection("offline", `cannot reach ${config.mqtt_url}`));
  client.on("error", (err) => setConnection("error", err.message));
  client.on("message", (topic, payload) => apply(prefix, topic, payload));
}

main();
