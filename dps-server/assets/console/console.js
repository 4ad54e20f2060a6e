// The console's only script (served from /console/assets, the one source the page's
// Content-Security-Policy allows): confirmation of destructive forms, and the live event
// table. Event fields are set as text, never as markup.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (e) => {
      if (!window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  }
  const table = document.querySelector("table[data-stream]");
  if (!table) return;
  const stream = new EventSource(table.dataset.stream);
  stream.addEventListener("open", () => { table.dataset.state = "open"; });
  const kinds = ["registration.assigned", "registration.moved", "registration.failed", "registration.disabled"];
  for (const kind of kinds) {
    stream.addEventListener(kind, (message) => {
      let event;
      try { event = JSON.parse(message.data); } catch { return; }
      const row = document.createElement("tr");
      row.className = "live";
      const error = event.errorCode ? `${event.errorCode} ${event.errorMessage || ""}` : "";
      for (const text of [event.time, event.kind, event.registrationId, event.assignedHub || "", error]) {
        const cell = document.createElement("td");
        cell.textContent = text || "";
        row.appendChild(cell);
      }
      table.tBodies[0].insertBefore(row, table.tBodies[0].rows[1] || null);
    });
  }
});
