// The review desk's keyboard and lease countdown. Loaded from /static (CSP: no inline scripts).
"use strict";

function submitForm(id, submitterId) {
  const form = document.getElementById(id);
  if (!form) return false;
  const submitter = submitterId ? document.getElementById(submitterId) : null;
  if (submitter) form.requestSubmit(submitter); else form.requestSubmit();
  return true;
}

function markExplicit() {
  const flag = document.getElementById("labels-explicit");
  if (flag) flag.value = "1";
}

function toggleLabel(key) {
  const box = document.querySelector('input[type=checkbox][data-key="' + key + '"]');
  if (!box) return;
  box.checked = !box.checked;
  markExplicit();
}

let pendingVerdict = null;

function itemKeys(event) {
  const target = event.target;
  const typing = target && (target.tagName === "TEXTAREA" ||
    (target.tagName === "INPUT" && (target.type === "text" || target.type === "number" ||
      target.type === "password")));
  if (typing) {
    if (event.key === "Escape") { target.blur(); pendingVerdict = null; }
    else if (event.key === "Enter" && target.id === "reason") {
      event.preventDefault();
      if (pendingVerdict) submitForm("verdict-form", pendingVerdict);
    }
    return;
  }
  const key = event.key;
  if (key >= "1" && key <= "9") { toggleLabel(key); event.preventDefault(); return; }
  switch (key) {
    case "a": submitForm("verdict-form", "approve"); break;
    case "r": {
      const reason = document.getElementById("reason");
      if (!reason) break;
      if (reason.value.trim()) { submitForm("verdict-form", "reject"); break; }
      pendingVerdict = "reject";
      reason.placeholder = "why reject? Enter to reject, Esc to cancel";
      reason.focus();
      break;
    }
    case "v": submitForm("reveal-form"); break;
    case "n": window.location.assign("/next"); break;
    case "e": submitForm("renew-form"); break;
    case "u": submitForm("release-form"); break;
    case "?": { const keys = document.getElementById("shortcuts"); if (keys) keys.focus(); break; }
    default: return;
  }
  event.preventDefault();
}

function queueKeys(event) {
  const target = event.target;
  if (target && (target.tagName === "INPUT" || target.tagName === "SELECT")) return;
  if (event.key === "n") { window.location.assign("/next"); event.preventDefault(); }
  else if (event.key === "c") { submitForm("claim-form"); event.preventDefault(); }
}

function leaseCountdown() {
  const lease = document.getElementById("lease");
  if (!lease) return;
  let left = parseInt(lease.dataset.remaining, 10);
  const show = () => {
    if (left <= 0) { lease.textContent = "expired: claim it again"; lease.classList.add("error"); return; }
    const m = Math.floor(left / 60), s = left % 60;
    lease.textContent = m + ":" + String(s).padStart(2, "0");
  };
  show();
  const timer = window.setInterval(() => { left -= 1; show(); if (left <= 0) window.clearInterval(timer); }, 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "item") {
    document.addEventListener("keydown", itemKeys);
    document.querySelectorAll("#verdict-form input[type=checkbox]").forEach((box) => {
      box.addEventListener("change", markExplicit);
    });
    leaseCountdown();
  } else if (page === "queue") {
    document.addEventListener("keydown", queueKeys);
  }
});
