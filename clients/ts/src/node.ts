// Transports for Node.js: gRPC (HTTP/2) to the gRPC port, the Connect protocol and gRPC-Web
// (HTTP/1.1) to the HTTP port.
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import type { Transport } from "@connectrpc/connect";

/** gRPC to the gRPC port, e.g. `grpcTransport("http://127.0.0.1:50051")`. */
export function grpcTransport(baseUrl: string): Transport {
  return createGrpcTransport({ baseUrl });
}

/** The Connect protocol to the HTTP port, e.g. `connectTransport("http://127.0.0.1:8080")`;
 * `json: true` sends JSON (readable in a proxy's log) instead of binary protobuf. */
export function connectTransport(baseUrl: string, options: { json?: boolean } = {}): Transport {
  return createConnectTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: !options.json });
}

/** gRPC-Web to the HTTP port (binary), as a browser would speak it. */
export function grpcWebTransport(baseUrl: string): Transport {
  return createGrpcWebTransport({ baseUrl, httpVersion: "1.1" });
}
