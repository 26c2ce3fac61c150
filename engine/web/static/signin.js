/* grove-engine web UI: the sign-in page's one step. The server answered the printed
 * address (its one-use token) with this page and a new session; keep the session in this
 * origin's localStorage (the origin is the server's own .localhost name: nothing else
 * shares it) and go on to the page asked for, replacing the address that carried the
 * token. A used token brings no session: a browser that signed in already goes on with
 * its own; any other is told. */
(function () {
  "use strict";
  const meta = (n) => {
    const m = document.querySelector('meta[name="' + n + '"]');
    return m ? m.getAttribute("content") || "" : "";
  };
  const say = (text) => { document.getElementById("signin").textContent = text; };
  let next = meta("grove-next");
  if (!/^\/[A-Za-z0-9/_.=&?-]*$/.test(next) || next.charAt(1) === "/") next = "/";
  const session = meta("grove-session");
  try {
    if (session) {
      window.localStorage.setItem("grove-session", session);
    } else if (!window.localStorage.getItem("grove-session")) {
      say("This address was already used to sign in a browser (or its token is wrong). " +
          "Restart engine ui for a new one.");
      return;
    }
  } catch (e) {
    say("This browser keeps no local storage for this page: the dashboard cannot sign in.");
    return;
  }
  window.location.replace(next);
})();
