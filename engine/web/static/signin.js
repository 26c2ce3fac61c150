/* grove-engine web UI: the sign-in page's one step. The server answered the printed
 * address (its token) with this page and a session value; keep the session in this
 * origin's localStorage (other ports of 127.0.0.1 cannot read it, unlike a cookie) and go
 * on to the page asked for, replacing the address that carried the token. */
(function () {
  "use strict";
  const meta = (n) => {
    const m = document.querySelector('meta[name="' + n + '"]');
    return m ? m.getAttribute("content") || "" : "";
  };
  const next = meta("grove-next");
  try {
    window.localStorage.setItem("grove-session", meta("grove-session"));
  } catch (e) {
    document.body.textContent = "This browser keeps no local storage for this page: " +
      "the dashboard cannot sign in.";
    return;
  }
  window.location.replace(next.charAt(0) === "/" && next.charAt(1) !== "/" ? next : "/");
})();
