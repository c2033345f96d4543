// Command aihow-kube-get reads Kubernetes API paths with a kubeconfig's credentials and prints
// the answers as one JSON array, in the order asked: a reader for the project's looks at a
// cluster (the power broker's pass, status) that starts in a fraction of kubectl's time.
//
//	aihow-kube-get [-kubeconfig FILE] [-timeout 30s] PATH...
//
// kubectl registers every API group's types and reads the server's discovery before its first
// request; under software emulation that start alone costs the control plane about a second of
// CPU (README, "What a kubectl run costs"), and the broker asks every few seconds. This asks
// only for the paths it is given, over one connection.
//
// The kubeconfig is -kubeconfig, else the first file KUBECONFIG lists (kubectl merges them all),
// else /etc/kubernetes/admin.conf. Its current context (without one: its first cluster and user)
// gives the server, the CA and the client certificate or bearer token, inline (*-data) or as
// files (relative to the kubeconfig's folder); a context, cluster or user it names but does not
// hold is an error. Exec plugins and auth providers are not run: a user with only those is
// anonymous (the server answers 401 or 403).
//
// Each answer is {"path": PATH, "code": HTTP_STATUS, "body": BODY}, BODY the server's JSON, or
// its text as a JSON string (/readyz says "ok"). Exit 0 when every path answered 2xx, 1 when one
// did not (every answer still printed); 3 with one line on stderr and nothing printed when the
// server could not be asked (no connection, TLS, no answer within -timeout); 2 for a usage or
// kubeconfig error.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

const defaultKubeconfig = "/etc/kubernetes/admin.conf"

type kubeconfig struct {
	CurrentContext string `json:"current-context"`
	Clusters       []struct {
		Name    string `json:"name"`
		Cluster struct {
			Server                   string `json:"server"`
			CertificateAuthority     string `json:"certificate-authority"`
			CertificateAuthorityData string `json:"certificate-authority-data"`
			InsecureSkipTLSVerify    bool   `json:"insecure-skip-tls-verify"`
		} `json:"cluster"`
	} `json:"clusters"`
	Users []struct {
		Name string `json:"name"`
		User struct {
			ClientCertificate     string `json:"client-certificate"`
			ClientCertificateData string `json:"client-certificate-data"`
			ClientKey             string `json:"client-key"`
			ClientKeyData         string `json:"client-key-data"`
			Token                 string `json:"token"`
		} `json:"user"`
	} `json:"users"`
	Contexts []struct {
		Name    string `json:"name"`
		Context struct {
			Cluster string `json:"cluster"`
			User    string `json:"user"`
		} `json:"context"`
	} `json:"contexts"`
}

// client is what a request needs: the server's base URL, a TLS transport and a bearer token
// (empty when a client certificate authenticates).
type client struct {
	server string
	http   *http.Client
	token  string
}

// pem returns inline base64 data, else the named file's content (a relative name is in dir),
// else nil.
func pem(data, file, dir string) ([]byte, error) {
	if data != "" {
		return base64.StdEncoding.DecodeString(data)
	}
	if file == "" {
		return nil, nil
	}
	if !filepath.IsAbs(file) {
		file = filepath.Join(dir, file)
	}
	return os.ReadFile(file)
}

func load(path string, timeout time.Duration) (*client, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var config kubeconfig
	if err := yaml.Unmarshal(text, &config); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	clusterName, userName := "", ""
	if config.CurrentContext != "" {
		found := false
		for _, c := range config.Contexts {
			if c.Name == config.CurrentContext {
				clusterName, userName, found = c.Context.Cluster, c.Context.User, true
			}
		}
		if !found {
			return nil, fmt.Errorf("%s: current-context %q is not one of its contexts", path, config.CurrentContext)
		}
	}
	cluster, user := -1, -1
	for i, c := range config.Clusters {
		if cluster < 0 && (clusterName == "" || c.Name == clusterName) {
			cluster = i
		}
	}
	for i, u := range config.Users {
		if user < 0 && (userName == "" || u.Name == userName) {
			user = i
		}
	}
	if clusterName != "" && cluster < 0 {
		return nil, fmt.Errorf("%s: cluster %q is not one of its clusters", path, clusterName)
	}
	if userName != "" && user < 0 {
		return nil, fmt.Errorf("%s: user %q is not one of its users", path, userName)
	}
	if cluster < 0 || config.Clusters[cluster].Cluster.Server == "" {
		return nil, fmt.Errorf("%s: no cluster with a server", path)
	}
	dir := filepath.Dir(path)
	c := config.Clusters[cluster].Cluster
	tlsConfig := &tls.Config{InsecureSkipVerify: c.InsecureSkipTLSVerify} //nolint:gosec // the kubeconfig's own choice
	ca, err := pem(c.CertificateAuthorityData, c.CertificateAuthority, dir)
	if err != nil {
		return nil, fmt.Errorf("%s: the cluster's CA: %w", path, err)
	}
	if ca != nil {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			return nil, fmt.Errorf("%s: the cluster's CA holds no PEM certificate", path)
		}
		tlsConfig.RootCAs = pool
	}
	token := ""
	if user >= 0 {
		u := config.Users[user].User
		cert, err := pem(u.ClientCertificateData, u.ClientCertificate, dir)
		if err != nil {
			return nil, fmt.Errorf("%s: the user's certificate: %w", path, err)
		}
		key, err := pem(u.ClientKeyData, u.ClientKey, dir)
		if err != nil {
			return nil, fmt.Errorf("%s: the user's key: %w", path, err)
		}
		if cert != nil || key != nil {
			pair, err := tls.X509KeyPair(cert, key)
			if err != nil {
				return nil, fmt.Errorf("%s: the user's certificate and key: %w", path, err)
			}
			tlsConfig.Certificates = []tls.Certificate{pair}
		}
		token = u.Token
	}
	transport := &http.Transport{TLSClientConfig: tlsConfig, ForceAttemptHTTP2: true}
	return &client{server: strings.TrimRight(c.Server, "/"), http: &http.Client{Transport: transport, Timeout: timeout}, token: token}, nil
}

type answer struct {
	Path string          `json:"path"`
	Code int             `json:"code"`
	Body json.RawMessage `json:"body"`
}

// get asks for path; an error only when the server could not be asked or its answer not read.
func (c *client) get(ctx context.Context, path string) (answer, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.server+path, nil)
	if err != nil {
		return answer{}, fmt.Errorf("GET %s: %w", path, err)
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "aihow-kube-get")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return answer{}, fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, fmt.Errorf("GET %s: reading the body: %w", path, err)
	}
	body = bytes.TrimSpace(body)
	if !json.Valid(body) {
		if body, err = json.Marshal(string(body)); err != nil {
			return answer{}, fmt.Errorf("GET %s: %w", path, err)
		}
	}
	return answer{Path: path, Code: resp.StatusCode, Body: body}, nil
}

func main() {
	kubeconfigPath := flag.String("kubeconfig", "", "the kubeconfig (default: $KUBECONFIG, else "+defaultKubeconfig+")")
	timeout := flag.Duration("timeout", 30*time.Second, "for the whole run")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: aihow-kube-get [-kubeconfig FILE] [-timeout 30s] PATH...\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	path := *kubeconfigPath
	if path == "" {
		path = strings.Split(os.Getenv("KUBECONFIG"), string(os.PathListSeparator))[0]
	}
	if path == "" {
		path = defaultKubeconfig
	}
	c, err := load(path, *timeout)
	if err != nil {
		fmt.Fprintf(os.Stderr, "aihow-kube-get: kubeconfig %v\n", err)
		os.Exit(2)
	}
	for _, p := range flag.Args() {
		if !strings.HasPrefix(p, "/") {
			fmt.Fprintf(os.Stderr, "aihow-kube-get: %q is not an API path (it starts with /)\n", p)
			os.Exit(2)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	answers := make([]answer, 0, flag.NArg())
	code := 0
	for _, p := range flag.Args() {
		a, err := c.get(ctx, p)
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) {
				err = fmt.Errorf("%w (no answer within %s)", err, *timeout)
			}
			fmt.Fprintf(os.Stderr, "aihow-kube-get: %v\n", err)
			os.Exit(3)
		}
		if a.Code/100 != 2 {
			code = 1
		}
		answers = append(answers, a)
	}
	out, err := json.Marshal(answers)
	if err == nil {
		_, err = os.Stdout.Write(append(out, '\n'))
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "aihow-kube-get: %v\n", err)
		os.Exit(3)
	}
	os.Exit(code)
}
