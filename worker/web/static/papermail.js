// papermail pages: small progressive enhancements; every page works without this file.
(function () {
  "use strict";
  var zone = "";
  try {
    zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "";
  } catch (e) {
    zone = "";
  }

  // Browsers report some zones by an old name (Asia/Calcutta); the page gives the
  // canonical name of each alias, which is what the form saves and shows.
  var canonical = function (name, aliases) {
    return Object.prototype.hasOwnProperty.call(aliases, name) ? aliases[name] : name;
  };

  // "Use this device's time zone" buttons: shown only when the browser knows its zone
  // and the field holds another one.
  document.querySelectorAll("[data-browser-tz]").forEach(function (button) {
    var target = document.getElementById(button.getAttribute("data-browser-tz"));
    if (!zone || !target) return;
    var aliases = {};
    try {
      aliases = JSON.parse(button.getAttribute("data-zone-aliases") || "{}");
    } catch (e) {
      aliases = {};
    }
    var device = canonical(zone, aliases);
    button.querySelector("[data-tz-name]").textContent = device;
    var sync = function () {
      button.hidden = canonical(target.value.trim(), aliases) === device;
    };
    target.addEventListener("input", sync);
    button.addEventListener("click", function () {
      target.value = device;
      sync();
      target.focus();
    });
    sync();
  });

  // Hidden zone fields (subscribe form) take the browser's zone when empty.
  document.querySelectorAll("input[data-fill-tz]").forEach(function (input) {
    if (zone && !input.value) input.value = zone;
  });

  // The weekday only matters for weekly digests: hide it for daily ones.
  var weekday = document.querySelector("[data-weekly-only]");
  if (weekday) {
    var radios = document.querySelectorAll('input[name="frequency"]');
    var sync = function () {
      var weekly = document.querySelector('input[name="frequency"][value="weekly"]');
      weekday.hidden = !(weekly && weekly.checked);
    };
    radios.forEach(function (r) { r.addEventListener("change", sync); });
    sync();
  }

  // After a failed save, move focus to the summary so screen readers announce it.
  var summary = document.getElementById("error-summary");
  if (summary) summary.focus();
})();
