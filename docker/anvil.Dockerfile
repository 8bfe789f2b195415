# syntax=docker/dockerfile:1
# The devnet chain of the compose example: anvil from its npm package (Linux x86_64 only).
FROM node:20-slim
RUN npm install --global @foundry-rs/anvil-linux-amd64@1.7.1 \
 && npm cache clean --force \
 && anvil --version
USER node
EXPOSE 8545
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:8545', {method: 'POST', headers: {'content-type': 'application/json'}, body: '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"eth_chainId\",\"params\":[]}'}).then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["anvil"]
CMD ["--host", "0.0.0.0", "--port", "8545", "--chain-id", "56", "--block-time", "1"]
