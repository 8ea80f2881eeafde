// Builds the chat page into static/, which the gateway serves at / and /static/.
import { defineConfig } from "vite";
import vue from "@vitejs/plugin-vue";

export default defineConfig({
  plugins: [vue()],
  base: "/static/",
  build: { outDir: "static", emptyOutDir: true, assetsDir: "assets" },
});
