// slidestream viewer: the slide's DeepZoom pyramid, the heatmap and the GeoJSON contours in
// OpenSeadragon. World (viewport) coordinates are level-0 px of the slide, y downwards.
// The page state is mirrored on <html data-*> (opened, tiles-loaded, max-level-loaded,
// l0-per-px, um-per-px, contours) so that a headless browser can check what was drawn.
(function () {
  "use strict";
  var OSD = OpenSeadragon;
  var cfg = JSON.parse(document.getElementById("ss-config").textContent);
  var state = document.documentElement.dataset;
  state.opened = "0";
  state.tilesLoaded = "0";
  state.maxLevelLoaded = "-1";
  state.maxLevel = String(cfg.slide.maxLevel);

  var sources = [{ tileSource: cfg.slide.source, x: 0, y: 0, width: cfg.slide.width }];
  if (cfg.heat) {
    sources.push({
      tileSource: { type: "image", url: cfg.heat.url },
      x: 0, y: 0, width: cfg.heat.width, opacity: cfg.heat.opacity,
    });
  }
  var viewer = OSD({
    id: "osd",
    drawer: "canvas", // file:// tiles are cross-origin: WebGL cannot upload them
    tileSources: sources,
    showNavigationControl: false,
    showNavigator: true,
    navigatorPosition: "TOP_RIGHT",
    maxZoomPixelRatio: 8,
    preserveImageSizeOnResize: true, // a window resize keeps µm per screen px
    visibilityRatio: 0.2,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
  });

  viewer.addHandler("tile-loaded", function (e) {
    if (e.tiledImage !== viewer.world.getItemAt(0)) return;
    state.tilesLoaded = String(+state.tilesLoaded + 1);
    if (e.tile.level > +state.maxLevelLoaded) state.maxLevelLoaded = String(e.tile.level);
  });

  // ------------------------------------------------------------ contours (SVG, level-0 px)
  var NS = "http://www.w3.org/2000/svg";
  var svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "ss-overlay");
  var group = document.createElementNS(NS, "g");
  svg.appendChild(group);
  cfg.contours.forEach(function (c) {
    var path = document.createElementNS(NS, "path");
    path.setAttribute("d", c.d);
    path.setAttribute("stroke", c.color);
    path.setAttribute("class", "ss-contour");
    var tip = document.createElementNS(NS, "title");
    tip.textContent = c.name;
    path.appendChild(tip);
    group.appendChild(path);
  });
  viewer.canvas.appendChild(svg);
  state.contours = String(group.childNodes.length);

  function screenScale() { // screen px per level-0 px (no rotation)
    var vp = viewer.viewport;
    return vp.pixelFromPoint(new OSD.Point(1000, 0), true).x / 1000 -
      vp.pixelFromPoint(new OSD.Point(0, 0), true).x / 1000;
  }

  // ------------------------------------------------------------ scale bar
  var bar = document.getElementById("ss-bar");
  var label = document.getElementById("ss-bar-label");
  function nice(v) {
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var m = v / p;
    return (m >= 5 ? 5 : m >= 2 ? 2 : 1) * p;
  }
  function scalebar(l0PerPx) {
    state.l0PerPx = l0PerPx.toPrecision(4);
    if (cfg.slide.mpp) {
      var um = l0PerPx * cfg.slide.mpp;
      var len = nice(120 * um);
      state.umPerPx = um.toPrecision(4);
      bar.style.width = (len / um).toFixed(1) + "px";
      label.textContent = (len >= 1000 ? len / 1000 + " mm" : len + " µm") +
        "  ·  " + um.toPrecision(3) + " µm/px";
    } else {
      var n = nice(120 * l0PerPx);
      bar.style.width = (n / l0PerPx).toFixed(1) + "px";
      label.textContent = n + " level-0 px (no mpp)";
    }
  }

  function place() {
    var origin = viewer.viewport.pixelFromPoint(new OSD.Point(0, 0), true);
    var s = screenScale();
    group.setAttribute("transform",
      "translate(" + origin.x + " " + origin.y + ") scale(" + s + ")");
    scalebar(1 / s);
  }

  // ------------------------------------------------------------ location in the URL hash
  // #x=<level-0 px>&y=<level-0 px>&scale=<level-0 px per screen px> (or mpp=<µm per screen px>)
  function fromHash() {
    var q = new URLSearchParams(location.hash.slice(1));
    if (opacity && q.has("opacity")) opacity.value = q.get("opacity");
    var s = +q.get("scale") || (cfg.slide.mpp ? +q.get("mpp") / cfg.slide.mpp : 0);
    if (!(s > 0)) return;
    var size = viewer.viewport.getContainerSize();
    var x = q.has("x") ? +q.get("x") : cfg.slide.size[0] / 2;
    var y = q.has("y") ? +q.get("y") : cfg.slide.size[1] / 2;
    viewer.viewport.fitBounds(
      new OSD.Rect(x - size.x * s / 2, y - size.y * s / 2, size.x * s, size.y * s), true);
  }
  function toHash() {
    var c = viewer.viewport.getCenter(true);
    var hash = "#x=" + Math.round(c.x) + "&y=" + Math.round(c.y) +
      "&scale=" + (1 / screenScale()).toPrecision(4) + (heat ? "&opacity=" + opacity.value : "");
    history.replaceState(null, "", hash);
  }

  // ------------------------------------------------------------ controls
  var heat = null;
  var opacity = document.getElementById("ss-opacity");
  var heatOn = document.getElementById("ss-heat");
  function applyHeat() {
    if (!heat) return;
    var v = heatOn.checked ? +opacity.value : 0;
    heat.setOpacity(v);
    state.heatOpacity = String(v);
  }
  if (opacity) opacity.addEventListener("input", applyHeat);
  if (heatOn) heatOn.addEventListener("change", applyHeat);
  var contoursOn = document.getElementById("ss-contours");
  if (contoursOn) {
    contoursOn.addEventListener("change", function () {
      svg.style.display = contoursOn.checked ? "" : "none";
    });
  }

  viewer.addHandler("open", function () {
    if (cfg.heat) heat = viewer.world.getItemAt(1);
    fromHash();
    applyHeat();
    place();
    state.items = String(viewer.world.getItemCount());
    state.opened = "1";
  });
  viewer.addHandler("open-failed", function (e) {
    state.opened = "failed";
    label.textContent = "could not open the pyramid: " + e.message;
  });
  viewer.addHandler("update-viewport", place);
  viewer.addHandler("resize", place);
  window.addEventListener("resize", function () { // redraw in the same frame (screenshots)
    viewer.forceResize();
    viewer.forceRedraw();
  });
  viewer.addHandler("animation-finish", toHash);
})();
