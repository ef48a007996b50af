// The one script of the ESSP pages (served from this app: the pages' CSP allows no other).
// A link marked data-top goes to a page of the Airflow UI around this page (a DAG run, a task). The UI
// shows plugin pages in an iframe that may not navigate the window, so the UI's own router is asked to go
// there (same origin: its history, then the popstate it listens to). Opened on its own, the link navigates.
document.addEventListener("click", (event) => {
  const link = event.target instanceof Element ? event.target.closest("a[data-top]") : null;
  if (!link || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) {
    return;
  }
  let outer;
  try {
    outer = window.top;
    if (outer === window || outer.location.origin !== window.location.origin) return;
  } catch (error) {
    return; // another origin: the browser decides
  }
  event.preventDefault();
  const url = new URL(link.href, window.location.href);
  outer.history.pushState({}, "", url.pathname + url.search + url.hash);
  outer.dispatchEvent(new PopStateEvent("popstate", { state: {} }));
});
