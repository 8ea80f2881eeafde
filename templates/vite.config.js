// Builds the chat page into the Python package (sse_gateway/static/), which the gateway serves
// at / and /static/. The build is committed: installing and running need no Node.js.
import { defineConfig } from "vite";
import vue from "@vitejs/plugin-vue";

export default defineConfig({
  plugins: [vue()],
  base: "/static/",
  build: { outDir: "../sse_gateway/static", emptyOutDir: true, assetsDir: "assets" },
});
